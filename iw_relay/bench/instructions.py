"""``iwrelay-bench instructions``: the relay's user-space instructions per delivery,
counted by callgrind: a figure that repeats on a busy or noisy machine, where CPU time
per delivery moves by a tenth from one run to the next.

For every run, a fresh relay starts as ``valgrind --tool=callgrind twistd -n iwrelay``
on a free loopback port, and a fanout or bigroom load runs at a low fixed rate (under
valgrind the relay runs tens of times slower; at the default rates each message still
has a reactor turn of its own, as in one room of 200 at 40,000 deliveries/s). Once
``--warmup-messages`` are relayed the counters are zeroed (``callgrind_control -z``);
``--seconds`` later they are dumped (``-d``). The messages relayed in between, read from
/stats just before the zeroing and just after the dump (so that neither request is
counted), times the members each reaches, are the deliveries; a message may fall on
either side of each end. Kernel time is not counted: what is measured is the Python
(and C) the relay runs per delivery. Loopback only; every process started is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, TextIO
from urllib.request import urlopen

from iw_relay.bench import runner
from iw_relay.bench.compare import (
    Server,
    free_port,
    relay_command,
    relay_root,
    sigterm_as_interrupt,
)
from iw_relay.bench.stats import StepReport, median

#: Each scenario's shape (clients, rooms, senders per room) and messages/s by default.
SHAPES = {"bigroom": (200, 1, 10, 10.0), "fanout": (500, 100, None, 100.0)}
START_TIMEOUT_S = 180.0  # twistd under valgrind takes tens of seconds to start
_TOTALS = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


def relayed(port: int) -> int:
    """The relay's messagesRelayed, from /stats."""
    with urlopen(f"http://127.0.0.1:{port}/stats", timeout=30) as reply:
        return int(json.load(reply)["messagesRelayed"])


def dumped_instructions(workdir: Path, pid: int) -> int:
    """The instructions in the dump `callgrind_control -d` wrote for `pid`."""
    dumps = sorted(workdir.glob(f"callgrind.out.{pid}.*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise runner.BenchError(f"callgrind wrote no dump for pid {pid} in {workdir}")
    found = _TOTALS.search(dumps[-1].read_bytes())
    if found is None:
        raise runner.BenchError(f"{dumps[-1]}: no totals line")
    return int(found.group(1))


class Window:
    """In a thread beside the load: wait for the warm-up messages, zero the counters,
    wait `seconds`, dump; `messages` and `error` tell what happened."""

    def __init__(self, server: Server, control: str, warmup: int, seconds: float,
                 deadline: float) -> None:
        self.server, self.control = server, control
        self.warmup, self.seconds, self.deadline = warmup, seconds, deadline
        self.messages = 0
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _control(self, flag: str) -> None:
        subprocess.run([self.control, flag, str(self.server.pid)], check=True,
                       capture_output=True, timeout=60)

    def _run(self) -> None:
        try:
            while relayed(self.server.port) < self.warmup:
                if time.monotonic() > self.deadline:
                    raise runner.BenchError("the warm-up messages never arrived")
                time.sleep(0.2)  # polling a process under valgrind; nothing to wait on
            before = relayed(self.server.port)
            self._control("-z")
            time.sleep(self.seconds)  # the counted window
            self._control("-d")
            self.messages = relayed(self.server.port) - before
        except Exception as problem:  # reported by measure(), in the main thread
            self.error = f"{type(problem).__name__}: {problem}"


def measure(args: argparse.Namespace, number: int, workdir: Path,
            err: TextIO) -> dict[str, Any]:
    """One run on a fresh relay: its pid, messages, deliveries and instructions."""
    clients, rooms, senders = args.clients, args.rooms, args.senders
    size = clients // rooms
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(relay_root()),
                                         *filter(None, [env.get("PYTHONPATH")])])
    argv = [args.valgrind, "--tool=callgrind",
            f"--callgrind-out-file={workdir}/callgrind.out.%p",
            *relay_command(port, args.relay_arg)]
    server = Server(f"relay-{number}", argv, env, port, None, workdir)
    print(f"run {number}: relay pid {server.pid} starting under callgrind", file=err,
          flush=True)
    try:
        server.wait_ready(START_TIMEOUT_S)
        warmup_s = args.warmup_messages / args.rate
        window = Window(server, args.callgrind_control, args.warmup_messages, args.seconds,
                        time.monotonic() + warmup_s + 120)
        window.thread.start()
        settings = runner.Settings(
            targets=[runner.parse_target(server.url)], workers=1, loop="auto",
            server_pids=[server.pid], duration=warmup_s + args.seconds + 10, warmup=0.0,
            max_steps=1, drain_timeout=30.0, connect_timeout=120.0, deadline=600.0)
        runner.run_rooms(settings, _ignore, args.load, clients, rooms, senders,
                         target_deliveries=[args.rate * (size - 1)])
        window.thread.join(timeout=args.seconds + 180)
        if window.error or window.thread.is_alive():
            raise runner.BenchError(f"run {number}: {window.error or 'the window never closed'}")
        instructions = dumped_instructions(workdir, server.pid)
    finally:
        server.stop()
    deliveries = window.messages * (size - 1)
    if not deliveries:
        raise runner.BenchError(f"run {number}: no message was relayed in the window")
    return {"run": number, "pid": server.pid, "messages": window.messages,
            "deliveries": deliveries, "instructions": instructions,
            "instructions_per_delivery": instructions / deliveries,
            "instructions_per_message": instructions / window.messages}


def _ignore(_: StepReport) -> None:
    pass


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> runner.Result:
    """`args.runs` fresh relays under callgrind; print the figures on `out`."""
    default = SHAPES[args.load]
    args.clients = args.clients or default[0]
    args.rooms = 1 if args.load == "bigroom" else (args.rooms or default[1])
    args.senders = (args.senders or default[2]) if args.load == "bigroom" else None
    args.rate = args.rate or default[3]
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(getattr(args, tool)) is None:
            raise runner.BenchError(f"{getattr(args, tool)} not found "
                                    "(Debian: apt-get install valgrind)")
    if args.clients // args.rooms < 2:
        raise runner.BenchError("rooms need two members at least")
    found = []
    with sigterm_as_interrupt(), \
            tempfile.TemporaryDirectory(prefix="iwrelay-instructions-") as workdir:
        for number in range(1, args.runs + 1):
            result = measure(args, number, Path(workdir), err)
            found.append(result)
            print(f"run {number}: {result['instructions_per_delivery']:,.0f} instructions "
                  f"per delivery ({result['deliveries']:,} deliveries, "
                  f"{result['messages']:,} messages)", file=err, flush=True)
    per_delivery = [r["instructions_per_delivery"] for r in found]
    shape = (f"1 room x {args.clients}, {args.senders} senders" if args.load == "bigroom"
             else f"{args.rooms} rooms x {args.clients // args.rooms}")
    print(f"instructions per delivery, {shape}, {args.rate:g} messages/s under callgrind: "
          f"{median(per_delivery):,.0f} ({min(per_delivery):,.0f}-{max(per_delivery):,.0f}),"
          f" {args.runs} run(s)", file=out)
    summary = {"kind": "summary", "scenario": "instructions", "shape": shape,
               "instructions_per_delivery_median": median(per_delivery), "runs": found}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return runner.Result(summary=summary)
