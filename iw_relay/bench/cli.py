"""``iwrelay-bench`` / ``python -m iw_relay.bench``: the command line.

    iwrelay-bench fanout  --url ws://127.0.0.1:3000 --server-pid PID --cpu 1
    iwrelay-bench bigroom --clients 200 --senders 10 ...
    iwrelay-bench idle    --clients 5000 --rooms 100 ...
    iwrelay-bench connect --clients 5000 --inflight 200 ...
    iwrelay-bench soak    --cycles 1000 ...
    iwrelay-bench fanout  --url ws://127.0.0.1:3001 --url ws://127.0.0.1:3002 \
                          --placement spread --server-pid P1 --server-pid P2 ...
    iwrelay-bench compare --original /path/to/server.js   (see compare.py)
    iwrelay-bench efficiency --runs 3                     (see efficiency.py)
    iwrelay-bench instructions --load bigroom             (see instructions.py)

One line per step on the terminal; ``--json`` prints one JSON object per step (and a
final ``"kind": "summary"`` object) on stdout instead. When connections fail, the
report's first line says how many and why (``REFUSED: ... HTTP 503 Too many
connections x12``); the line naming the run goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

try:
    from iw_relay.bench import runner
except ImportError as missing:  # picows or uvloop: the [bench] extra
    runner = None  # type: ignore[assignment]
    MISSING: ImportError | None = missing
else:
    MISSING = None
from iw_relay.bench.stats import P99_LIMIT_MS, StepReport, format_step, human_bytes

FAIR_RATE_LIMIT = 90.0  # runner.FAIR_RATE_LIMIT, here so that --help works without it
DEFAULT_URL = "ws://127.0.0.1:3000"
COMPARE_FIGURES = ("connect", "fanout", "bigroom", "idle")  # compare.FIGURES, in order
EFFICIENCY_SETUPS = ("one", "two", "redis-room", "redis-split")  # efficiency.SETUPS
DEFAULT_STEPS = {"fanout": 12, "bigroom": 12, "idle": 5, "connect": 3, "soak": 5}


def cpu_list(text: str) -> list[int]:
    """'1', '0,2', '2-3' -> CPU numbers."""
    cpus: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            cpus.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU list: {text!r}") from None
    if not cpus:
        raise argparse.ArgumentTypeError("empty CPU list")
    return cpus


def number_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError("rates must be positive")
    return values


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("target and generator")
    group.add_argument("--url", action="append", dest="urls", metavar="URL",
                       help="relay to load; loopback only (127.0.0.1, ::1, localhost); "
                            "repeat it for the nodes of a cluster (see --placement) "
                            f"[default: {DEFAULT_URL}]")
    group.add_argument("--placement", choices=("room", "spread"), default="room",
                       help="with several --url: room = all of a room's members on one "
                            "node, rooms round-robin over the nodes; spread = each room's "
                            "members spread over all nodes [default: %(default)s]")
    group.add_argument("--server-pid", type=int, action="append", dest="server_pids",
                       metavar="PID",
                       help="a relay process (or redis-server...) whose CPU time and RSS "
                            "are read from /proc; repeatable: the figures are summed, "
                            "each also shown")
    group.add_argument("--cpu", type=cpu_list,
                       help="pin the generator to these CPUs, e.g. 1 or 2-3")
    group.add_argument("--workers", type=positive_int,
                       help="generator processes [default: one per CPU it may use]")
    group.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                       help="event loop of the workers; auto = uvloop when installed")
    group.add_argument("--json", action="store_true",
                       help="one JSON object per step (and a summary) on stdout")
    bounds = common.add_argument_group("bounds")
    bounds.add_argument("--duration", type=positive_float, default=5.0,
                        help="seconds of sending per step [default: %(default)s]")
    bounds.add_argument("--max-steps", type=positive_int,
                        help="at most this many steps (parts for idle and soak) "
                             "[default: fanout/bigroom 12, idle 5, connect 3, soak 5]")
    bounds.add_argument("--deadline", type=positive_float, default=600.0,
                        help="the whole run stops after this many seconds "
                             "[default: %(default)s]")
    bounds.add_argument("--drain-timeout", type=positive_float, default=3.0,
                        help="after a step, how long to wait for late deliveries; those "
                             "still missing are lost [default: %(default)s]")
    bounds.add_argument("--connect-timeout", type=positive_float, default=60.0,
                        help="longest time to open a scenario's connections "
                             "[default: %(default)s]")
    bounds.add_argument("--inflight", type=positive_int, default=200,
                        help="handshakes in flight at once [default: %(default)s]")
    bounds.add_argument("--payload-bytes", type=int, default=0, dest="pad",
                        help="padding added to every bench message [default: 0]")

    ramp = argparse.ArgumentParser(add_help=False)
    group = ramp.add_argument_group("rate ramp (messages/s per sending connection)")
    group.add_argument("--rates", type=number_list,
                       help="explicit per-sender rates, e.g. 5,10,20")
    group.add_argument("--target-deliveries", type=number_list,
                       help="deliveries/s per step, e.g. 10000 (converted to per-sender "
                            "rates)")
    group.add_argument("--rate", type=positive_float, default=5.0,
                       help="first rate of the ramp [default: %(default)s]")
    group.add_argument("--rate-factor", type=float, default=1.5,
                       help="each step multiplies the rate by this [default: %(default)s]")
    group.add_argument("--rate-step", type=float, default=0.0,
                       help="add this instead of multiplying")
    group.add_argument("--warmup", type=float, default=0.0,
                       help="seconds of sending at the first rate before the first step, "
                            "not reported [default: 0]")
    group.add_argument("--max-rate", type=positive_float, default=FAIR_RATE_LIMIT,
                       help="last rate of the ramp [default: %(default)s, under the "
                            "original relay's fixed limit of 100/s per connection]")
    group.add_argument("--keep-going", action="store_true",
                       help="do not stop at the first saturated step")

    parser = argparse.ArgumentParser(
        prog="iwrelay-bench",
        description="Load generator for relays speaking the iw-relay protocol. Saturation "
                    f"is the highest step whose p99 latency is under {P99_LIMIT_MS:g} ms "
                    "with no loss.",
    )
    scenarios = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")

    fanout = scenarios.add_parser(
        "fanout", parents=[common, ramp],
        help="N clients in R rooms, all (or some) sending; ramp the rate until saturation")
    fanout.add_argument("--clients", type=positive_int, default=500)
    fanout.add_argument("--rooms", type=positive_int, default=100)
    fanout.add_argument("--senders-per-room", type=positive_int,
                        help="senders in each room [default: every member]")

    bigroom = scenarios.add_parser(
        "bigroom", parents=[common, ramp],
        help="one room of N members, a few of them sending; ramp the rate")
    bigroom.add_argument("--clients", type=positive_int, default=200)
    bigroom.add_argument("--senders", type=positive_int, default=10)

    idle = scenarios.add_parser(
        "idle", parents=[common],
        help="hold N idle connections over R rooms: server memory per connection")
    idle.add_argument("--clients", type=positive_int, default=5000)
    idle.add_argument("--rooms", type=positive_int, default=100)
    idle.add_argument("--hold", type=float, default=2.0,
                      help="seconds to wait before reading the RSS [default: %(default)s]")

    connect = scenarios.add_parser(
        "connect", parents=[common],
        help="handshakes per second: N connections, K in flight (--inflight), N rounds")
    connect.add_argument("--clients", type=positive_int, default=5000)
    connect.add_argument("--rooms", type=positive_int, default=100)

    soak = scenarios.add_parser(
        "soak", parents=[common],
        help="a bounded number of connect/join/send/leave cycles (pairs in fresh rooms)")
    soak.add_argument("--cycles", type=positive_int, default=1000)
    soak.add_argument("--concurrency", type=positive_int, default=20)
    soak.add_argument("--messages", type=positive_int, default=10,
                      help="messages each member of a pair sends [default: %(default)s]")
    soak.add_argument("--cycle-timeout", type=positive_float, default=10.0)

    add_compare_parser(scenarios)
    add_efficiency_parser(scenarios)
    add_instructions_parser(scenarios)
    return parser


def add_compare_parser(scenarios: Any) -> None:
    """The ``compare`` sub-command (compare.py): its options."""
    parser = scenarios.add_parser(
        "compare", help="iw-relay against the original Node relay, fresh servers, "
                        "medians of several runs",
        description="For every figure and run, a fresh server of each implementation "
                    "(iw-relay as twistd, the original as node server.js), pinned to "
                    "--server-cpu, the generator on --generator-cpu; medians, spread "
                    "and ratio iw-relay / original. Loopback only; every server started "
                    "is stopped.")
    parser.add_argument("--original", required=True, type=Path, metavar="SERVER_JS",
                        help="the original relay's server.js (with its node_modules)")
    parser.add_argument("--node", default="node", help="node binary [default: %(default)s]")
    add_runs_options(parser, "figure and implementation", "--figures", COMPARE_FIGURES)
    parser.add_argument("--server-cpu", type=int, default=0,
                        help="CPU the server is pinned to [default: %(default)s]")
    parser.add_argument("--generator-cpu", type=int, default=1,
                        help="CPU the load generator is pinned to [default: %(default)s]")
    add_fixed_load_options(parser, 40_000.0, 3.0, 3600.0)
    parser.add_argument("--connect-clients", type=int, default=10_000)
    parser.add_argument("--inflight", type=int, default=200)
    parser.add_argument("--fanout-clients", type=int, default=500)
    parser.add_argument("--fanout-rooms", type=int, default=100)
    parser.add_argument("--bigroom-clients", type=int, default=200)
    parser.add_argument("--bigroom-senders", type=int, default=10)
    parser.add_argument("--idle-clients", type=int, default=15_000)
    parser.add_argument("--idle-rooms", type=int, default=100)
    parser.add_argument("--idle-hold", type=float, default=2.0,
                        help="seconds between the last idle connection and the RSS "
                             "reading [default: %(default)s]")


def add_runs_options(parser: argparse.ArgumentParser, per: str, option: str,
                     choices: tuple[str, ...]) -> None:
    """What compare and efficiency share: how many runs, and which of their cases."""
    parser.add_argument("--runs", type=int, default=3,
                        help=f"fresh servers per {per} [default: %(default)s]")
    parser.add_argument(option, default=",".join(choices),
                        help="comma-separated, among " + ", ".join(choices)
                             + " [default: all]")


def add_fixed_load_options(parser: argparse.ArgumentParser, deliveries: float,
                           warmup: float, deadline: float) -> None:
    """What compare and efficiency share: fresh relays measured at a fixed load."""
    add_relay_options(parser)
    parser.add_argument("--deliveries", type=float, default=deliveries,
                        help="fixed deliveries/s [default: %(default)s]")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of the measured sending step [default: %(default)s]")
    parser.add_argument("--warmup", type=float, default=warmup,
                        help="seconds of sending before it, not measured "
                             "[default: %(default)s]")
    parser.add_argument("--deadline", type=float, default=deadline,
                        help="the whole command stops after this many seconds "
                             "[default: %(default)s]")


def add_relay_options(parser: argparse.ArgumentParser) -> None:
    """What every command that starts its own relays shares."""
    parser.add_argument("--relay-arg", action="append", default=[], metavar="ARG",
                        help="an extra option for iw-relay's twistd plugin (repeatable), "
                             "e.g. --relay-arg=--log-level=warn")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write every run's figures to FILE as JSON")


def add_efficiency_parser(scenarios: Any) -> None:
    """The ``efficiency`` sub-command (efficiency.py): its options."""
    parser = scenarios.add_parser(
        "efficiency", help="cluster efficiency: fresh nodes with and without Redis, "
                           "medians of several runs",
        description="For every run and setup, fresh servers (redis-server, one or two "
                    "twistd nodes) on loopback, a fixed fanout load, the CPU of every "
                    "server process summed; medians and spread of CPU per delivery, p99 "
                    "and the efficiencies. Every process started is stopped.")
    add_runs_options(parser, "setup", "--setups", EFFICIENCY_SETUPS)
    parser.add_argument("--clients", type=int, default=400)
    parser.add_argument("--rooms", type=int, default=100)
    add_fixed_load_options(parser, 20_000.0, 2.0, 1800.0)
    parser.add_argument("--workers", type=int, default=1,
                        help="generator processes [default: %(default)s]")
    parser.add_argument("--redis-server", default="redis-server",
                        help="redis-server binary [default: %(default)s]")
    parser.add_argument("--lock", type=Path, metavar="FILE",
                        help="hold an exclusive flock on FILE while each setup runs, so "
                             "that other benchmarks taking it never overlap one")


def add_instructions_parser(scenarios: Any) -> None:
    """The ``instructions`` sub-command (instructions.py): its options."""
    parser = scenarios.add_parser(
        "instructions", help="the relay's instructions per delivery, counted by callgrind",
        description="For every run, a fresh relay under valgrind --tool=callgrind on "
                    "loopback, a low fixed load, the instructions counted over a window "
                    "of --seconds after --warmup-messages; instructions per delivery. "
                    "Needs valgrind. Every process started is stopped.")
    parser.add_argument("--load", choices=("bigroom", "fanout"), default="bigroom",
                        help="one room of many, or many small rooms [default: %(default)s]")
    parser.add_argument("--clients", type=positive_int,
                        help="[default: 200 for bigroom, 500 for fanout]")
    parser.add_argument("--rooms", type=positive_int, help="fanout [default: 100]")
    parser.add_argument("--senders", type=positive_int, help="bigroom [default: 10]")
    parser.add_argument("--rate", type=positive_float,
                        help="messages/s in all [default: 10 for bigroom, 100 for fanout]")
    parser.add_argument("--warmup-messages", type=positive_int, default=40,
                        help="messages relayed before counting starts [default: %(default)s]")
    parser.add_argument("--seconds", type=positive_float, default=20.0,
                        help="seconds counted [default: %(default)s]")
    parser.add_argument("--runs", type=positive_int, default=1,
                        help="fresh relays [default: %(default)s; the counts repeat]")
    add_relay_options(parser)
    parser.add_argument("--valgrind", default="valgrind",
                        help="valgrind binary [default: %(default)s]")
    parser.add_argument("--callgrind-control", default="callgrind_control",
                        help="callgrind_control binary [default: %(default)s]")


class Printer:
    """Step lines for people (stdout) or JSON objects for machines (stdout, with the
    lines on stderr when that is a terminal)."""

    def __init__(self, as_json: bool, out: TextIO, err: TextIO) -> None:
        self.as_json = as_json
        self.out = out
        self.err = err
        self.lines_to_err = as_json and err.isatty()

    def say(self, text: str) -> None:
        if not self.as_json:
            print(text, file=self.out, flush=True)
        elif self.lines_to_err:
            print(text, file=self.err, flush=True)

    def warn(self, text: str) -> None:
        print(f"iwrelay-bench: {text}", file=self.err, flush=True)

    def note(self, text: str) -> None:
        """Progress for people, never in the report: stderr."""
        if not self.as_json or self.lines_to_err:
            print(text, file=self.err, flush=True)

    def step(self, report: StepReport) -> None:
        refusal = report.extra.get("refusal")
        if refusal:  # why connections failed comes before the step that counts them
            self.say(refusal)
        if self.as_json:
            print(json.dumps(report.as_dict()), file=self.out, flush=True)
        self.say(format_step(report))

    def summary(self, summary: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(summary), file=self.out, flush=True)
        self.say(format_summary(summary))


def format_summary(summary: dict[str, Any]) -> str:
    """The summary; when connections failed, its first line says how many and why."""
    text = _format_summary(summary)
    refusal = summary.get("refusal")
    return f"{refusal}\n{text}" if refusal else text


def _format_summary(summary: dict[str, Any]) -> str:
    scenario = summary.get("scenario")
    if scenario in ("fanout", "bigroom"):
        best = summary.get("saturation")
        head = f"{scenario}: stopped: {summary.get('stopped')}; "
        if summary.get("refused"):
            return head + "no step was run"
        if best is None:
            return head + "no step passed (p99 < 100 ms, no loss)"
        reached = "" if best["reached"] else " (not saturated: the last passing step)"
        per = best.get("server_cpu_us_per_delivery")
        return (head + f"saturation {best['delivered_per_s']:,.0f} deliveries/s at "
                f"{best['rate_per_sender']:g} msg/s per sender, p99 {best['p99_ms']:.1f} ms"
                + (f", server {per:.1f} us/delivery" if per is not None else "") + reached)
    if scenario == "idle":
        return (f"idle: {summary['connections_held']} connections, server memory "
                f"{human_bytes(summary['bytes_per_connection'])} per connection")
    if scenario == "connect":
        rate = summary["median_conns_per_s"]
        return f"connect: median {rate if rate is None else f'{rate:,.0f}'} connections/s"
    if scenario == "soak":
        before, after = summary.get("registry_before"), summary.get("registry_after")
        return (f"soak: {summary['cycles']} cycles, {summary['failures']} failures, loss "
                f"{summary['loss']}, server RSS {human_bytes(summary['rss_first_bytes'])} -> "
                f"{human_bytes(summary['rss_last_bytes'])} (growth "
                f"{human_bytes(summary['rss_growth_bytes'])}); relay holds before "
                f"{before if before is not None else 'unknown'}, after "
                f"{after if after is not None else 'unknown'}")
    return json.dumps(summary)


def run(argv: Sequence[str] | None = None, out: TextIO | None = None,
        err: TextIO | None = None) -> runner.Result:
    """Parse `argv`, run the scenario, print as it goes; raises BenchError."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    args = build_parser().parse_args(argv)
    if MISSING is not None:
        raise BenchUnavailableError(
            f"{MISSING}: the benchmark needs the [bench] extra: "
            "pip install 'iw-relay[bench]' (picows, uvloop)")
    if args.scenario == "compare":
        from iw_relay.bench import compare
        return compare.run(args, out, err)
    if args.scenario == "efficiency":
        from iw_relay.bench import efficiency
        return efficiency.run(args, out, err)
    if args.scenario == "instructions":
        from iw_relay.bench import instructions
        return instructions.run(args, out, err)
    printer = Printer(args.json, out, err)
    urls = args.urls or [DEFAULT_URL]
    targets = [runner.parse_target(url) for url in urls]
    pids = args.server_pids or []
    for pid in pids:
        try:
            runner.procstat.check_pid(pid)
        except ValueError as problem:
            raise runner.BenchError(str(problem)) from None
    if args.cpu:
        try:
            runner.pin(args.cpu)
        except OSError as problem:
            raise runner.BenchError(f"--cpu {args.cpu}: {problem}") from None
    workers = args.workers or len(os.sched_getaffinity(0))
    settings = runner.Settings(
        targets=targets, workers=workers, loop=args.loop, server_pids=pids,
        placement=args.placement, warmup=getattr(args, "warmup", 0.0),
        duration=args.duration, max_steps=args.max_steps or DEFAULT_STEPS[args.scenario],
        deadline=args.deadline, drain_timeout=args.drain_timeout,
        connect_timeout=args.connect_timeout, inflight=args.inflight, pad=args.pad,
        keep_going=getattr(args, "keep_going", False),
    )
    printer.note(f"iwrelay-bench {args.scenario} -> {' '.join(urls)} "
                 + (f"(placement {args.placement}) " if len(urls) > 1 else "")
                 + f"(server pid {','.join(map(str, pids)) or '-'}, {workers} worker(s), "
                 f"cpu {','.join(map(str, sorted(os.sched_getaffinity(0))))})")
    if args.scenario in ("fanout", "bigroom"):
        rates = args.rates or []
        if max(rates, default=0) > runner.FAIR_RATE_LIMIT or (
                not rates and not args.target_deliveries
                and args.max_rate > runner.FAIR_RATE_LIMIT):
            printer.warn(f"a rate above {runner.FAIR_RATE_LIMIT:g} messages/s per connection: "
                         "the original relay drops messages past 100/s per connection")
        if args.scenario == "fanout":
            clients, rooms, senders = args.clients, args.rooms, args.senders_per_room
        else:
            clients, rooms, senders = args.clients, 1, args.senders
        result = runner.run_rooms(
            settings, printer.step, args.scenario, clients, rooms, senders,
            rates=args.rates, target_deliveries=args.target_deliveries,
            ramp=(args.rate, args.rate_factor, args.rate_step, args.max_rate),
        )
    elif args.scenario == "idle":
        result = runner.run_idle(settings, printer.step, args.clients, args.rooms, args.hold)
    elif args.scenario == "connect":
        result = runner.run_connect(settings, printer.step, args.clients, args.rooms,
                                    args.inflight)
    else:
        result = runner.run_soak(settings, printer.step, args.cycles, args.concurrency,
                                 args.messages, args.cycle_timeout)
    printer.summary(result.summary)
    return result


class BenchUnavailableError(Exception):
    """The [bench] extra is not installed."""


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0, 1 when connections were refused, 2 for an error."""
    errors: tuple[type[Exception], ...] = (BenchUnavailableError,)
    if runner is not None:
        errors += (runner.BenchError,)
    try:
        result = run(argv)
    except errors as problem:
        print(f"iwrelay-bench: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1 if result.summary.get("refused") else 0
