"""``iwrelay-bench compare``: iw-relay and the original Node.js relay side by side.

For every figure and every run, a fresh server of each implementation is started on
127.0.0.1 (iw-relay as a real ``twistd -n --pidfile= iwrelay`` subprocess, the original
as ``node server.js`` with ``PORT``), pinned to the server CPU while the generator runs
on another; the scenario runs, the server's CPU and RSS are read from /proc, and the
server is stopped. The table gives each implementation's median over the runs, the
spread (lowest-highest) and the ratio iw-relay / original.

The original's code is never part of this repository: its path is an argument.
Every server this command starts is stopped before it returns, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.request import urlopen

from iw_relay.bench import runner
from iw_relay.bench.cli import COMPARE_FIGURES
from iw_relay.bench.stats import StepReport, median

IMPLEMENTATIONS = ("iw-relay", "original")
FIGURES = COMPARE_FIGURES
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
# The original closes a connection's window at 100 messages/s: every load stays far below.
ORIGINAL_RATE_LIMIT = 100


# -- servers --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relay_root() -> Path:
    """The directory that holds the iw_relay package (and the twistd dropin beside it)."""
    return Path(runner.__file__).resolve().parents[2]


def relay_command(port: int, extra: Sequence[str]) -> list[str]:
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "iwrelay", "--port", f"tcp:{port}:interface=127.0.0.1",
            "--rate-limit", str(ORIGINAL_RATE_LIMIT), "--max-connections-per-ip", "0",
            *extra]


class Server:
    """One server process on 127.0.0.1:`port`, pinned to `cpu` (None: not pinned), its
    output in a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int,
                 cpu: int | None, workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = workdir / f"{name}-{port}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=workdir, start_new_session=True,
                preexec_fn=lambda: _child_setup(cpu),
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        """Whether /health answers 200 (both implementations serve it)."""
        try:
            with urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until `ready()`, or BenchError once the process exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise runner.BenchError(f"{self.name} exited with {self.process.returncode}:"
                                        f"\n{self.log_tail()}")
            if self.ready():
                return
            if time.monotonic() > deadline:
                raise runner.BenchError(f"{self.name} did not answer /health within "
                                        f"{timeout:g}s:\n{self.log_tail()}")
            time.sleep(0.05)  # polling a child that is starting; nothing to wait on

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; only this process is signalled."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _child_setup(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    raise_fd_limit()


def raise_fd_limit() -> int:
    """Raise this process's soft descriptor limit to its hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            return soft
        return wanted
    return soft


# -- one measurement ------------------------------------------------------------------


@dataclass
class Measurement:
    figure: str
    implementation: str
    run: int
    values: dict[str, float | None] = field(default_factory=dict)
    pid: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """What every measurement needs: the options and where the servers come from."""

    args: argparse.Namespace
    workdir: Path
    started: float
    note: Callable[[str], None]

    def left(self) -> float:
        return self.args.deadline - (time.monotonic() - self.started)

    def start(self, implementation: str) -> Server:
        port = free_port()
        cpu = self.args.server_cpu
        if implementation == "iw-relay":
            env = dict(os.environ)
            root = str(relay_root())
            env["PYTHONPATH"] = os.pathsep.join(
                [root, *filter(None, [env.get("PYTHONPATH")])])
            argv = relay_command(port, self.args.relay_arg)
        else:
            env = dict(os.environ, PORT=str(port))
            argv = [self.args.node, str(self.args.original.resolve())]
        server = Server(implementation, argv, env, port, cpu, self.workdir)
        try:
            server.wait_ready()
        except BaseException:
            server.stop()
            raise
        return server

    def settings(self, server: Server, deadline: float, **extra: Any) -> runner.Settings:
        return runner.Settings(
            targets=[runner.parse_target(server.url)], workers=1, loop="auto",
            server_pids=[server.pid], deadline=min(deadline, max(self.left(), 1.0)),
            **extra)

    def measure(self, figure: str, implementation: str, run: int) -> Measurement:
        args = self.args
        found = Measurement(figure, implementation, run)
        server = self.start(implementation)
        found.pid = server.pid
        try:
            if figure == "connect":
                settings = self.settings(server, 300, max_steps=1,
                                         inflight=args.inflight, connect_timeout=120)
                result = runner.run_connect(settings, _ignore, args.connect_clients,
                                            min(100, args.connect_clients), args.inflight)
                step = result.steps[0] if result.steps else None
                found.values = {
                    "conns_per_s": step.extra.get("conns_per_s") if step else None,
                    "cpu_us_per_connection": step.server_cpu_us_per_unit if step else None,
                    "failed": step.failures if step else None,
                }
            elif figure in ("fanout", "bigroom"):
                settings = self.settings(server, 300, duration=args.duration,
                                         warmup=args.warmup, max_steps=1,
                                         drain_timeout=5.0, connect_timeout=60)
                if figure == "fanout":
                    shape = (args.fanout_clients, args.fanout_rooms, None)
                else:
                    shape = (args.bigroom_clients, 1, args.bigroom_senders)
                result = runner.run_rooms(settings, _ignore, figure, *shape,
                                          target_deliveries=[args.deliveries])
                if measured_step(result, found.values, found.notes) is None:
                    return found
            elif figure == "idle":
                settings = self.settings(server, 300, connect_timeout=120,
                                         inflight=args.inflight, max_steps=5)
                result = runner.run_idle(settings, _ignore, args.idle_clients,
                                         args.idle_rooms, args.idle_hold)
                found.values = {
                    "bytes_per_connection": result.summary.get("bytes_per_connection"),
                    "held": result.summary.get("connections_held"),
                }
            else:
                raise runner.BenchError(f"unknown figure {figure!r}")
            if result.summary.get("refusal"):
                found.notes.append(result.summary["refusal"])
        finally:
            server.stop()
        return found


def _ignore(_: StepReport) -> None:
    pass


def measured_step(result: runner.Result, values: dict[str, float | None],
                  notes: list[str]) -> StepReport | None:
    """A fixed-load run's last step, its figures added to `values` and `notes`; None
    (and why, in `notes`) when no step ran."""
    step = result.steps[-1] if result.steps else None
    if step is None:
        notes.append(result.summary.get("refusal", "no step ran"))
        return None
    figures, found = delivery_figures(step)
    values.update(figures)
    notes.extend(found)
    return step


def delivery_figures(step: StepReport) -> tuple[dict[str, float | None], list[str]]:
    """A fanout or bigroom step's figures, and notes on them.

    When the generator lagged (its sending loop woke more than 50 ms late: it waited for
    a core), its latencies are mostly its own wait and its catch-up bursts, not the
    server's: they are left out (None, shown as "-"), not averaged into the medians.
    CPU per delivery is kept: it does not depend on the generator's pace.
    """
    lagged = step.generator_lagging
    figures: dict[str, float | None] = {
        "cpu_us_per_delivery": step.server_cpu_us_per_unit,
        "p50_ms": None if lagged else step.latency_ms.get("p50"),
        "p99_ms": None if lagged else step.latency_ms.get("p99"),
        "delivered_per_s": step.delivered_per_s,
        "loss": step.loss,
    }
    notes = ["the generator lagged: no latency figure"] if lagged else []
    if step.loss:
        notes.append(f"{step.loss} deliveries lost")
    return figures, notes


# -- the table ------------------------------------------------------------------------

# (figure, value key, label, unit, digits, higher is better)
ROWS: tuple[tuple[str, str, str, str, int, bool], ...] = (
    ("connect", "conns_per_s", "connections/s", "/s", 0, True),
    ("connect", "cpu_us_per_connection", "server CPU per handshake", "us", 0, False),
    ("fanout", "cpu_us_per_delivery", "CPU per delivery", "us", 2, False),
    ("fanout", "p50_ms", "p50", "ms", 2, False),
    ("fanout", "p99_ms", "p99", "ms", 2, False),
    ("bigroom", "cpu_us_per_delivery", "CPU per delivery", "us", 2, False),
    ("bigroom", "p50_ms", "p50", "ms", 2, False),
    ("bigroom", "p99_ms", "p99", "ms", 2, False),
    ("idle", "bytes_per_connection", "memory per idle connection", "KiB", 2, False),
)


def figure_shape(figure: str, args: argparse.Namespace) -> str:
    """What a figure measured, in words, for its table rows."""
    if figure == "connect":
        return f"{args.connect_clients:,} connections, {args.inflight} in flight"
    if figure == "fanout":
        return (f"{args.fanout_rooms} rooms x {args.fanout_clients // args.fanout_rooms}, "
                f"{args.deliveries:,.0f} deliveries/s")
    if figure == "bigroom":
        return (f"1 room x {args.bigroom_clients}, {args.bigroom_senders} senders, "
                f"{args.deliveries:,.0f} deliveries/s")
    return f"{args.idle_clients:,} idle in {args.idle_rooms} rooms, fresh server"


def _fmt(value: float | None, unit: str, digits: int) -> str:
    if value is None:
        return "-"
    if unit == "KiB":
        value = value / 1024
    return f"{value:,.{digits}f}"


def table(measurements: Sequence[Measurement], figures: Sequence[str], args: argparse.Namespace
          ) -> tuple[str, list[dict[str, Any]]]:
    """The side-by-side table as text, and its rows as dicts."""
    rows: list[dict[str, Any]] = []
    lines = []
    header = ("figure", "unit", "iw-relay median (range)", "original median (range)",
              "ratio", "ratio per run")
    for figure, key, label, unit, digits, _ in ROWS:
        if figure not in figures:
            continue
        label = f"{label}, {figure_shape(figure, args)}"
        per: dict[str, list[float]] = {}
        by_run: dict[str, dict[int, float]] = {}
        for implementation in IMPLEMENTATIONS:
            values = {m.run: m.values.get(key) for m in measurements
                      if m.figure == figure and m.implementation == implementation}
            by_run[implementation] = {r: v for r, v in values.items() if v is not None}
            per[implementation] = list(by_run[implementation].values())
        ours, theirs = median(per["iw-relay"]), median(per["original"])
        ratio = ours / theirs if ours is not None and theirs else None
        run_ratios = [by_run["iw-relay"][r] / by_run["original"][r]
                      for r in sorted(by_run["iw-relay"])
                      if by_run["original"].get(r)]
        cells = []
        for implementation, mid in (("iw-relay", ours), ("original", theirs)):
            spread = per[implementation]
            cells.append(f"{_fmt(mid, unit, digits)} ({_fmt(min(spread), unit, digits)}-"
                         f"{_fmt(max(spread), unit, digits)})" if spread else "-")
        lines.append((label, unit, *cells, "-" if ratio is None else f"{ratio:.2f}x",
                      ", ".join(f"{r:.2f}" for r in run_ratios) or "-"))
        rows.append({"figure": figure, "key": key, "label": label, "unit": unit,
                     "iw-relay": per["iw-relay"], "original": per["original"],
                     "iw-relay_median": ours, "original_median": theirs, "ratio": ratio,
                     "run_ratios": run_ratios})
    widths = [max(len(str(row[i])) for row in (header, *lines)) for i in range(len(header))]
    rule = "  ".join("=" * width for width in widths)
    text = [rule, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), rule]
    text += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in lines]
    text.append(rule)
    return "\n".join(text), rows


# -- the command ----------------------------------------------------------------------


def machine_state() -> str:
    load = os.getloadavg()
    return f"load average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"


def versions(args: argparse.Namespace) -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    try:
        found["node"] = subprocess.run([args.node, "--version"], capture_output=True,
                                       text=True, timeout=10).stdout.strip()
    except OSError as problem:
        raise runner.BenchError(f"cannot run {args.node}: {problem}") from None
    ws_package = args.original.resolve().parent / "node_modules" / "ws" / "package.json"
    try:
        found["ws"] = json.loads(ws_package.read_text())["version"]
    except (OSError, ValueError, KeyError):
        found["ws"] = "unknown"
    for module in ("twisted", "autobahn", "picows"):
        try:
            found[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            found[module] = "unknown"
    git = shutil.which("git")
    if git:
        head = subprocess.run([git, "-C", str(relay_root()), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            found["iw-relay"] = head.stdout.strip()
    return found


def chosen(option: str, text: str, known: Sequence[str], runs: int) -> list[str]:
    """The comma-separated names of `text`, each among `known`, else BenchError (as
    for `runs` under 1)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = set(names) - set(known)
    if unknown or not names:
        raise runner.BenchError(f"{option}: unknown {sorted(unknown)} (one of "
                                f"{', '.join(known)})")
    if runs < 1:
        raise runner.BenchError("--runs must be at least 1")
    return names


def check(args: argparse.Namespace) -> list[str]:
    """The figures to run; BenchError for what cannot work on this machine."""
    figures = chosen("--figures", args.figures, FIGURES, args.runs)
    if not args.original.is_file():
        raise runner.BenchError(f"--original {args.original}: no such file")
    usable = os.sched_getaffinity(0)
    for option, cpu in (("--server-cpu", args.server_cpu),
                        ("--generator-cpu", args.generator_cpu)):
        if cpu not in usable:
            raise runner.BenchError(f"{option} {cpu}: not among this process's CPUs "
                                    f"{sorted(usable)}")
    if args.server_cpu == args.generator_cpu:
        raise runner.BenchError("--server-cpu and --generator-cpu must differ")
    limit = raise_fd_limit()
    wanted = max(args.idle_clients if "idle" in figures else 0,
                 args.connect_clients if "connect" in figures else 0) + 256
    if limit < wanted:
        raise runner.BenchError(
            f"the descriptor limit is {limit} (ulimit -n), under the {wanted} that "
            f"{wanted - 256:,} connections need; raise it or lower the counts")
    return figures


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> runner.Result:
    """Run every figure `args.runs` times on fresh servers; print the table on `out`."""
    figures = check(args)
    found_versions = versions(args)

    def note(text: str) -> None:
        print(text, file=err, flush=True)

    affinity = os.sched_getaffinity(0)
    runner.pin([args.generator_cpu])  # the workers spawned from now on inherit it
    load_before = machine_state()
    measurements: list[Measurement] = []
    try:
        with sigterm_as_interrupt(), \
                tempfile.TemporaryDirectory(prefix="iwrelay-compare-") as workdir:
            plan = Plan(args, Path(workdir), time.monotonic(), note)
            for figure in figures:
                for number in range(1, args.runs + 1):
                    # Alternate who goes first, so neither always meets a warmer machine.
                    order = IMPLEMENTATIONS if number % 2 else IMPLEMENTATIONS[::-1]
                    for implementation in order:
                        if plan.left() < 30:
                            raise runner.BenchError(
                                f"--deadline {args.deadline:g}s reached")
                        found = plan.measure(figure, implementation, number)
                        measurements.append(found)
                        note(f"{figure} run {number} {implementation}: "
                             + ", ".join(f"{k} {v:.4g}" if isinstance(v, float)
                                         else f"{k} {v}" for k, v in found.values.items())
                             + "".join(f" [{n}]" for n in found.notes)
                             + f"  ({machine_state()})")
    finally:
        os.sched_setaffinity(0, affinity)
    load_after = machine_state()
    text, rows = table(measurements, figures, args)
    notes = [f"{m.figure} run {m.run} {m.implementation}: {n}"
             for m in measurements for n in m.notes]
    print(f"iw-relay / original, {args.runs} fresh servers per figure and implementation; "
          f"server on CPU {args.server_cpu}, generator on CPU {args.generator_cpu}", file=out)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found_versions.items()), file=out)
    print(f"machine: before {load_before}; after {load_after}", file=out)
    print(text, file=out)
    for line in notes:
        print(f"note: {line}", file=out)
    summary = {"kind": "summary", "scenario": "compare", "versions": found_versions,
               "load_before": load_before, "load_after": load_after, "rows": rows,
               "runs": [m.__dict__ for m in measurements]}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    result = runner.Result(summary=summary)
    return result


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so that the servers started are
    stopped on the way out (each runs in a session of its own: a signal to this process
    does not reach them)."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
