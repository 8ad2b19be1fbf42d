"""iwrelay-bench: the figures' arithmetic, and each scenario at tiny scale against a real
iw-relay (twistd in a subprocess on 127.0.0.1).

The benchmark is the ``[bench]`` extra (picows, uvloop): without picows this module is
skipped, with the reason.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.request import urlopen

import pytest

pytest.importorskip(
    "picows", reason="the benchmark needs the [bench] extra: pip install '.[bench]'")

from iw_relay.bench import cli, compare, efficiency, procstat, runner
from iw_relay.bench.stats import (
    ProcessUsage,
    StepReport,
    expected_deliveries,
    format_step,
    latency_summary,
    median,
    percentile,
    saturation,
)
from iw_relay.bench.wsclient import (
    JoinRefusedError,
    describe_failure,
    match_presence,
    parse_bench,
)

ROOT = Path(__file__).resolve().parent.parent
STARTED = re.compile(r"RelaySite starting on (\d+)")

# -- percentiles and reports ---------------------------------------------------------


def test_percentile_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 90) == 90
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 0.5) == 1
    assert percentile([7], 50) == percentile([7], 99) == 7
    assert percentile([1, 2], 50) == 1
    assert percentile([1, 2], 51) == 2
    assert percentile([], 50) is None


@pytest.mark.parametrize("q", [0, -1, 100.5])
def test_percentile_refuses_out_of_range(q):
    with pytest.raises(ValueError):
        percentile([1, 2, 3], q)


def test_latency_summary_in_milliseconds_and_ordered():
    samples = [5_000_000, 1_000_000, 3_000_000, 2_000_000, 4_000_000] * 20 + [90_000_000]
    summary = latency_summary(samples)
    assert summary["count"] == 101
    assert summary["p50"] == 3.0
    assert summary["max"] == 90.0
    assert summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]
    empty = latency_summary([])
    assert empty == {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}


def test_median():
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 3, 2]) == 2.5
    assert median([]) is None


def test_expected_deliveries_counts_the_other_members():
    sizes = {"a": 5, "b": 2, "c": 1}
    assert expected_deliveries({"a": 10, "b": 3, "c": 7}, sizes) == 10 * 4 + 3 * 1 + 0


def step(number, delivered, expected=None, p99=1.0, failures=0, duration=1.0):
    return StepReport("fanout", number, duration, sent=delivered,
                      expected=delivered if expected is None else expected,
                      delivered=delivered, failures=failures,
                      latency_ms={"count": 1, "p50": p99, "p90": p99, "p99": p99,
                                  "max": p99})


def test_a_lagging_generators_latencies_are_left_out_of_the_comparison():
    steady = step(1, 1000, expected=1000, p99=2.5)
    figures, notes = compare.delivery_figures(steady)
    assert (figures["p50_ms"], figures["p99_ms"], notes) == (2.5, 2.5, [])
    lagging = step(1, 990, expected=1000, p99=900.0)
    lagging.generator_lagging = True
    figures, notes = compare.delivery_figures(lagging)
    assert (figures["p50_ms"], figures["p99_ms"], figures["loss"]) == (None, None, 10)
    assert notes == ["the generator lagged: no latency figure", "10 deliveries lost"]


def test_step_report_rates_loss_and_ok():
    report = step(1, 900, expected=1000, duration=2.0)
    assert report.offered_per_s == 450
    assert report.expected_per_s == 500
    assert report.delivered_per_s == 450
    assert report.loss == 100
    assert report.loss_ratio == pytest.approx(0.1)
    assert not report.ok
    assert step(1, 1000).ok
    assert not step(1, 1000, p99=100.0).ok
    assert not step(1, 1000, failures=1).ok
    handshake = step(1, 0, p99=5000.0)
    handshake.latency_bound = False
    assert handshake.ok


def test_server_cpu_per_delivery():
    report = step(1, 2000)
    report.server = ProcessUsage(cpu_s=0.5, wall_s=1.0, rss_bytes=10, rss_start_bytes=5)
    assert report.server_cpu_us_per_unit == 250.0
    assert report.server.cpu_percent == 50.0
    report.units = 100
    assert report.server_cpu_us_per_unit == 5000.0
    as_json = json.loads(json.dumps(report.as_dict()))
    assert as_json["server"]["cpu_us_per_delivery"] == 5000.0
    assert as_json["server"]["cpu_percent"] == 50.0
    assert "ok" in format_step(report)


def test_saturation_is_the_best_passing_step():
    steps = [step(1, 100), step(2, 200), step(3, 400, p99=150.0), step(4, 300, 310)]
    assert saturation(steps).step == 2
    assert saturation([step(1, 100, p99=200.0)]) is None
    assert saturation([]) is None
    assert "SATURATED" in format_step(steps[2])


def test_rate_schedule():
    assert runner.rate_schedule([5, 10], 1, 2, 0, 90, 10) == [5, 10]
    assert runner.rate_schedule([5, 10, 20], 1, 2, 0, 90, 2) == [5, 10]
    assert runner.rate_schedule(None, 10, 2, 0, 90, 10) == [10, 20, 40, 80, 90]
    assert runner.rate_schedule(None, 10, 2, 0, 90, 3) == [10, 20, 40]
    assert runner.rate_schedule(None, 10, 1, 30, 90, 10) == [10, 40, 70, 90]


def test_cpu_list():
    assert cli.cpu_list("1") == [1]
    assert cli.cpu_list("0,2-3") == [0, 2, 3]


@pytest.mark.parametrize("url", [
    "ws://10.0.0.1:3000", "ws://example.com:3000", "ws://127.0.0.2:3000",
    "ws://192.168.1.1/", "wss://127.0.0.1:3000", "http://127.0.0.1:3000",
])
def test_only_loopback_targets(url):
    with pytest.raises(runner.BenchError):
        runner.parse_target(url)


def test_loopback_targets():
    target = runner.parse_target("ws://127.0.0.1:3000/relay/")
    assert (target.host, target.port, target.base) == ("127.0.0.1", 3000, "/relay")
    assert target.path("abc") == "/relay/room/abc"
    assert runner.parse_target("ws://[::1]:3001").host_header == "[::1]:3001"
    assert runner.parse_target("ws://localhost:3002").port == 3002


def test_refused_target_exits_without_connecting(capsys):
    assert cli.main(["fanout", "--url", "ws://10.9.8.7:3000"]) == 2
    assert "loopback" in capsys.readouterr().err


def test_parse_bench():
    relayed = b'{"type":"bench","s":12,"t":345,"connectionId":"ab","timestamp":1}'
    assert parse_bench(relayed, 0, len(relayed)) == (b"12", 345)
    framed = b"xx" + relayed + b"yy"
    assert parse_bench(framed, 2, 2 + len(relayed)) == (b"12", 345)
    alone = b'{"type":"bench","s":1,"t":99}'
    assert parse_bench(alone, 0, len(alone)) == (b"1", 99)
    assert parse_bench(b'{"type":"connected"}', 0, 20) is None
    assert parse_bench(b'{"type":"bench","s":1,"x":2}', 0, 28) is None


def presence_count(data: bytes) -> int | None:
    match = match_presence(data)
    return int(match[1]) if match else None


def test_presence_count_reads_the_relays_notices_and_nothing_else():
    from iw_relay import messages

    assert presence_count(messages.user_joined("ab12", 7)) == 7
    assert presence_count(messages.user_left("ab12", 0)) == 0
    # the original's layout, with a field after the count
    assert presence_count(b'{"type":"user-left","connectionId":"x","userCount":12,'
                          b'"timestamp":5}') == 12
    for other in (b'{"type":"connected","userCount":3}',
                  b'{"type":"user-joined","connectionId":"x","userCount":"12"}',
                  b'{"type":"user-joined","data":{"userCount":9},"userCount":3}',
                  b'{"type":"user-joined","connectionId":"x"}'):
        assert presence_count(other) is None, other


def test_describe_failure_names_the_reason():
    from picows import WSInvalidStatusError

    refused = WSInvalidStatusError(
        "upgrade failed", raw_header=b"HTTP/1.1 503 Too many connections\r\nA: b\r\n")
    assert describe_failure(refused) == "HTTP 503 Too many connections"
    assert describe_failure(ConnectionRefusedError(111, "Connection refused")) == \
        "connection refused"
    assert describe_failure(TimeoutError()) == "timeout"
    assert describe_failure(JoinRefusedError("close 1008 Invalid room ID")) == \
        "close 1008 Invalid room ID"


def test_failure_line_puts_the_commonest_reason_first():
    line = runner.failure_line(5, 9, {"timeout": 1, "HTTP 503 Too many connections": 4})
    assert line == ("REFUSED: 5 of 9 connections failed: HTTP 503 Too many connections x4, "
                    "timeout x1")


@pytest.mark.parametrize("placement", ["room", "spread"])
def test_placement(placement):
    settings = runner.Settings(targets=[runner.parse_target(f"ws://127.0.0.1:{port}")
                                        for port in (3001, 3002, 3003)],
                               placement=placement)
    run = runner.Run(settings, lambda step: None)
    members = runner.room_members(run, 24, 6, None)
    nodes_of: dict[str, set[int]] = {}
    for member in members:
        nodes_of.setdefault(member.room, set()).add(member.node)
    per_node = [sum(1 for m in members if m.node == node) for node in range(3)]
    assert per_node == [8, 8, 8]
    if placement == "room":
        assert all(len(nodes) == 1 for nodes in nodes_of.values())
        assert {min(nodes) for nodes in nodes_of.values()} == {0, 1, 2}
    else:
        assert all(nodes == {0, 1, 2} for nodes in nodes_of.values())


def test_procstat_reads_this_process():
    before = procstat.Sample.of(os.getpid())
    assert before.rss > 0
    assert procstat.cpu_seconds(os.getpid()) >= before.cpu_s
    with pytest.raises(ValueError):
        procstat.check_pid(2**22 + 12345)


# -- scenarios against a real relay ----------------------------------------------------


class RelayProcess:
    """twistd iwrelay on 127.0.0.1, port chosen by the kernel and read from its log."""

    def __init__(self, *options: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "iwrelay",
             "--port", "tcp:0:interface=127.0.0.1", "--log-level", "info", *options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
        self.port: int | None = None
        self.lines: list[str] = []
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(30) or self.port is None:
            self.stop()
            raise RuntimeError("the relay did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            found = STARTED.search(line)
            if found and self.port is None:
                self.port = int(found.group(1))
                self._listening.set()
        self._listening.set()  # the process ended

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self._reader.join(5)


@pytest.fixture(scope="module")
def relay_process():
    relay = RelayProcess("--rate-limit", "1000000")
    yield relay
    relay.stop()


def bench(relay, *argv: str):
    out = io.StringIO()
    result = cli.run([*argv, "--url", relay.url, "--server-pid", str(relay.process.pid),
                      "--deadline", "60", "--workers", "1"], out=out, err=io.StringIO())
    return result, out.getvalue()


def assert_consistent(report):
    assert report.failures == 0
    assert report.errors == 0
    assert report.stale == 0
    assert report.loss == 0
    assert report.delivered == report.expected > 0
    latency = report.latency_ms
    assert latency["count"] == report.delivered
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert report.server is not None and report.server.cpu_s >= 0
    assert report.server.rss_bytes > 0
    assert report.ok


def test_fanout(relay_process):
    result, out = bench(relay_process, "fanout", "--clients", "6", "--rooms", "2",
                        "--rates", "5,10", "--duration", "0.5")
    assert [s.rate_per_sender for s in result.steps] == [5, 10]
    for report in result.steps:
        assert_consistent(report)
        assert report.connections == 6 and report.senders == 6 and report.rooms == 2
        assert report.sent == 6 * report.rate_per_sender * 0.5
        assert report.expected == report.sent * 2  # rooms of 3: two others each
    assert result.summary["saturation"]["step"] == result.steps[-1].step
    assert not result.summary["saturation"]["reached"]
    lines = [line for line in out.splitlines() if line.startswith("fanout #")]
    assert len(lines) == 2


def test_fanout_target_deliveries_with_two_workers(relay_process):
    out = io.StringIO()
    result = cli.run(["fanout", "--url", relay_process.url, "--clients", "8", "--rooms", "2",
                      "--target-deliveries", "240", "--duration", "0.5", "--workers", "2",
                      "--senders-per-room", "2", "--deadline", "60"], out=out)
    (report,) = result.steps
    assert report.rate_per_sender == 240 / (4 * 3)
    assert report.senders == 4
    assert report.server is None
    assert report.expected == report.sent * 3 == 120
    assert report.delivered == report.expected


def test_bigroom(relay_process):
    result, _ = bench(relay_process, "bigroom", "--clients", "8", "--senders", "2",
                      "--rates", "10", "--duration", "0.5")
    (report,) = result.steps
    assert_consistent(report)
    assert report.rooms == 1 and report.senders == 2
    assert report.expected == report.sent * 7


def test_idle(relay_process):
    result, out = bench(relay_process, "idle", "--clients", "20", "--rooms", "4",
                        "--hold", "0", "--max-steps", "2")
    assert [s.connections for s in result.steps] == [10, 20]
    for report in result.steps:
        assert report.failures == 0 and report.ok
        assert report.extra["conns_per_s"] > 0
        assert isinstance(report.extra["bytes_per_connection"], int)
    assert result.steps[-1].extra["settled"]
    assert result.summary["connections_held"] == 20
    assert "per connection" in out


def test_connect(relay_process):
    result, _ = bench(relay_process, "connect", "--clients", "20", "--rooms", "4",
                      "--inflight", "5", "--max-steps", "2")
    assert len(result.steps) == 2
    for report in result.steps:
        assert report.connections == 20 and report.failures == 0 and report.ok
        assert report.latency_ms["count"] == 20
        assert report.latency_ms["p50"] <= report.latency_ms["p99"] <= report.latency_ms["max"]
        assert report.extra["aborted_on_close"] == 0
    assert result.summary["median_conns_per_s"] > 0


def test_soak(relay_process):
    result, _ = bench(relay_process, "soak", "--cycles", "10", "--concurrency", "3",
                      "--messages", "3", "--max-steps", "2")
    assert [s.extra["cycles"] for s in result.steps] == [5, 5]
    for report in result.steps:
        assert_consistent(report)
        assert report.expected == 5 * 2 * 3
    assert result.summary["cycles"] == 10
    assert result.summary["failures"] == 0 and result.summary["loss"] == 0


def test_json_output_parses(relay_process):
    completed = subprocess.run(
        [sys.executable, "-m", "iw_relay.bench", "fanout", "--json", "--url",
         relay_process.url, "--server-pid", str(relay_process.process.pid),
         "--clients", "4", "--rooms", "2", "--rates", "5,10", "--duration", "0.3",
         "--workers", "1", "--deadline", "60"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert completed.returncode == 0, completed.stderr
    objects = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [o["kind"] for o in objects] == ["step", "step", "summary"]
    for obj in objects[:2]:
        assert obj["delivered"] == obj["expected_deliveries"] > 0
        assert obj["loss"] == 0 and obj["ok"]
        assert obj["latency_ms"]["p50"] <= obj["latency_ms"]["p99"]
        assert obj["server"]["cpu_us_per_delivery"] is None or \
            obj["server"]["cpu_us_per_delivery"] >= 0
    assert objects[2]["saturation"]["step"] == 2


def test_rate_limited_relay_shows_loss():
    """Past the relay's rate limit, messages are dropped: loss, errors, not ok."""
    relay = RelayProcess("--rate-limit", "2")
    try:
        result, _ = bench(relay, "fanout", "--clients", "4", "--rooms", "2",
                          "--rates", "20", "--duration", "0.5", "--drain-timeout", "0.5")
    finally:
        relay.stop()
    (report,) = result.steps
    assert report.loss > 0
    assert report.errors > 0
    assert not report.ok
    assert result.summary["saturation"] is None
    assert result.summary["stopped"] == "saturated"


# -- why connections fail, several nodes, the side-by-side comparison ----------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_refusal_is_the_first_line_of_the_report():
    """Over the per-address limit the relay answers 503: the report starts by saying
    how many connections failed and with which status and reason."""
    relay = RelayProcess("--max-connections-per-ip", "2")
    try:
        result, out = bench(relay, "connect", "--clients", "5", "--rooms", "1",
                            "--inflight", "5", "--max-steps", "1")
        lines = out.splitlines()
        assert re.match(r"REFUSED: 3 of 5 connections failed: HTTP 503 \S.* x3$", lines[0])
        assert "FAILED" in lines[1]
        assert result.summary["refused"] == {lines[0].split(": ", 2)[2][:-3]: 3}
        result, out = bench(relay, "fanout", "--clients", "6", "--rooms", "2",
                            "--rates", "5", "--duration", "0.3")
        lines = out.splitlines()
        assert lines[0].startswith("REFUSED: 4 of 6 connections failed: HTTP 503 ")
        assert "no step was run" in lines[1]
        assert result.steps == []
    finally:
        relay.stop()


def test_nothing_listening_is_named(capsys):
    url = f"ws://127.0.0.1:{free_port()}"
    status = cli.main(["connect", "--url", url, "--clients", "3", "--rooms", "1",
                       "--max-steps", "1",
                       "--workers", "1", "--deadline", "60"])
    assert status == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "REFUSED: 3 of 3 connections failed: connection refused x3"


def connections_total(relay) -> int:
    with urlopen(f"http://127.0.0.1:{relay.port}/stats", timeout=5) as reply:
        return json.load(reply)["connectionsTotal"]


def test_two_nodes_each_server_measured(relay_process):
    """Two --url and two --server-pid: rooms placed whole on a node relay without loss;
    the CPU is summed and each server is shown; spread placement uses both nodes."""
    other = RelayProcess("--rate-limit", "1000000")
    try:
        relays = (relay_process, other)
        before = [connections_total(r) for r in relays]
        argv = ["fanout", "--clients", "8", "--rooms", "2", "--rates", "10",
                "--duration", "0.5", "--workers", "1", "--deadline", "60"]
        for relay in relays:
            argv += ["--url", relay.url, "--server-pid", str(relay.process.pid)]
        result = cli.run(argv, out=io.StringIO(), err=io.StringIO())
        (report,) = result.steps
        assert_consistent(report)
        servers = report.extra["servers"]
        assert [s["pid"] for s in servers] == [r.process.pid for r in relays]
        assert report.server.cpu_s == pytest.approx(sum(s["cpu_s"] for s in servers),
                                                    abs=1e-3)
        assert report.server.rss_bytes == sum(s["rss_bytes"] for s in servers)
        after = [connections_total(r) for r in relays]
        assert [a - b for a, b in zip(after, before, strict=True)] == [4, 4]
        # Spread: each room's members on both nodes (connect: unclustered nodes would
        # never show a spread room full, which a sending scenario waits for).
        nodes = argv[argv.index("--url"):]
        result = cli.run(["connect", "--clients", "8", "--rooms", "2", "--max-steps", "1",
                          "--workers", "1", "--placement", "spread", *nodes],
                         out=io.StringIO(), err=io.StringIO())
        assert result.steps[0].connections == 8
        spread = [connections_total(r) - a for r, a in zip(relays, after, strict=True)]
        assert spread == [4, 4]
    finally:
        other.stop()


def test_without_picows_the_tool_says_which_extra():
    """With picows missing, the command names the [bench] extra instead of a traceback."""
    completed = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['picows'] = None; "
         "from iw_relay.bench import cli; sys.exit(cli.main(['connect']))"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert completed.returncode == 2
    assert "[bench]" in completed.stderr and "Traceback" not in completed.stderr


def test_compare_table_medians_spread_and_ratio():
    args = argparse.Namespace(connect_clients=10, inflight=2, deliveries=100.0,
                              fanout_clients=10, fanout_rooms=2, bigroom_clients=5,
                              bigroom_senders=1, idle_clients=10, idle_rooms=2)
    found = []
    for run, (ours, theirs) in enumerate([(10.0, 20.0), (30.0, 40.0), (20.0, 10.0)], 1):
        found.append(compare.Measurement("connect", "iw-relay", run, {"conns_per_s": ours}))
        found.append(compare.Measurement("connect", "original", run, {"conns_per_s": theirs}))
    text, rows = compare.table(found, ["connect"], args)
    (row,) = [r for r in rows if r["key"] == "conns_per_s"]
    assert row["iw-relay_median"] == 20.0 and row["original_median"] == 20.0
    assert row["ratio"] == 1.0
    assert row["run_ratios"] == [0.5, 0.75, 2.0]
    assert "20 (10-30)" in text and "20 (10-40)" in text and "0.50, 0.75, 2.00" in text


STANDIN = '''\
"""Stands in for the original relay in the comparison test: iw-relay on $PORT."""
import os, sys
os.environ["PYTHONPATH"] = {root!r}
os.execv(sys.executable, [sys.executable, "-c",
         "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "iwrelay",
         "--port", "tcp:%s:interface=127.0.0.1" % os.environ["PORT"],
         "--max-connections-per-ip", "0"])
'''


def test_compare_runs_both_and_stops_every_server(tmp_path):
    """The whole comparison at tiny scale, with a stand-in for the original: fresh
    servers per run, a table with ratios, and no server left running afterwards."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("the comparison pins the server and the generator to two CPUs")
    standin = tmp_path / "server.js"
    standin.write_text(STANDIN.format(root=str(ROOT)))
    report = tmp_path / "compare.json"
    out = io.StringIO()
    cli.run(["compare", "--original", str(standin), "--node", sys.executable,
             "--runs", "1", "--figures", "connect,fanout,idle",
             "--server-cpu", str(cpus[0]), "--generator-cpu", str(cpus[1]),
             "--connect-clients", "20", "--inflight", "5", "--fanout-clients", "6",
             "--fanout-rooms", "2", "--deliveries", "120", "--duration", "0.5",
             "--warmup", "0.2", "--idle-clients", "20", "--idle-rooms", "4", "--idle-hold", "0",
             "--json", str(report), "--deadline", "150"], out=out, err=io.StringIO())
    assert sorted(os.sched_getaffinity(0)) == cpus  # the caller's affinity is restored
    text = out.getvalue()
    assert "versions: " in text and "load average" in text
    summary = json.loads(report.read_text())
    runs = summary["runs"]
    assert len(runs) == 3 * 2
    assert len({r["pid"] for r in runs}) == len(runs)  # a fresh server every time
    for found in runs:
        with pytest.raises(ProcessLookupError):
            os.kill(found["pid"], 0)
        # (a loaded machine may make the generator lag; nothing may be refused)
        assert not [n for n in found["notes"] if "lagged" not in n], found
    rows = {(r["figure"], r["key"]): r for r in summary["rows"]}
    fanout = rows[("fanout", "cpu_us_per_delivery")]
    assert len(fanout["iw-relay"]) == len(fanout["original"]) == 1
    # /proc counts CPU in 10 ms ticks: a tiny run may read 0 on either side; the ratio is
    # then the medians' quotient, or None (shown as "-") when the original's is 0.
    ours, theirs = fanout["iw-relay_median"], fanout["original_median"]
    assert ours is not None and theirs is not None
    assert fanout["ratio"] == (pytest.approx(ours / theirs) if theirs else None)
    assert rows[("connect", "conns_per_s")]["ratio"] > 0
    assert rows[("idle", "bytes_per_connection")]["iw-relay_median"] is not None
    for row in summary["rows"]:
        assert ("-" if row["ratio"] is None else f"{row['ratio']:.2f}x") in text


def test_efficiency_table_is_per_run_ratios():
    """Efficiencies are the ratio in each run, then their median and spread."""
    cpu = {"two": [10.0, 12.0, 11.0], "redis-room": [10.0, 12.0, 22.0],
           "redis-split": [20.0, 20.0, 22.0], "one": [20.0, 12.0, 11.0]}
    found = [efficiency.Measurement(setup, run, {"cpu_us_per_delivery": values[run - 1],
                                                 "p99_ms": 1.0})
             for setup, values in cpu.items() for run in (1, 2, 3)]
    text, figures = efficiency.table(found, list(cli.EFFICIENCY_SETUPS))
    ratios = figures["efficiencies"]
    assert ratios["efficiency, rooms on one node (target 0.9)"] == {
        "values": [1.0, 1.0, 0.5], "median": 1.0}
    assert ratios["efficiency, rooms split (target 0.6)"]["values"] == [0.5, 0.6, 0.5]
    assert "0.50 (0.50-0.60)" in text and "11.00 (10.00-12.00)" in text


def test_efficiency_runs_every_setup_and_stops_every_server(tmp_path):
    """The whole command at tiny scale: a fresh redis-server and fresh nodes for every
    setup, every figure > 0, and no process left running afterwards."""
    from tests.redis_process import redis_binary

    report = tmp_path / "efficiency.json"
    out = io.StringIO()
    result = cli.run(["efficiency", "--runs", "1", "--clients", "8", "--rooms", "2",
                      "--deliveries", "600", "--duration", "1.5", "--warmup", "0.3",
                      "--redis-server", redis_binary(), "--json", str(report),
                      "--deadline", "200"], out=out, err=io.StringIO())
    summary = json.loads(report.read_text())
    assert summary["setups"] == result.summary["setups"]
    runs = summary["runs"]
    assert [r["setup"] for r in runs] == list(cli.EFFICIENCY_SETUPS)
    assert [len(r["pids"]) for r in runs] == [1, 2, 3, 3]  # the nodes, then redis-server
    pids = [pid for r in runs for pid in r["pids"]]
    assert len(set(pids)) == len(pids)  # fresh servers every time
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    for found in runs:
        assert not [n for n in found["notes"] if "lagged" not in n], found
        assert found["values"]["loss"] == 0
        assert found["values"]["cpu_us_per_delivery"] > 0
    for name, setup in summary["setups"].items():
        assert setup["cpu_us_per_delivery_median"] > 0, name
    split = next(r for r in runs if r["setup"] == "redis-split")["values"]
    assert split["publish_per_s"] > 0 and split["messages_per_publish"] > 0
    assert len(summary["efficiencies"]) == 3
    for label, ratio in summary["efficiencies"].items():
        assert ratio["median"] > 0
        assert label in out.getvalue()


def test_instructions_counts_a_window_on_a_fresh_relay_and_stops_it(tmp_path):
    """The whole command at tiny scale, under a real valgrind: a fresh relay per run,
    a window of relayed messages, instructions per delivery in a plausible range, and
    no process left running afterwards."""
    from tests.cluster_harness import binary

    valgrind = binary("valgrind", "IWRELAY_REQUIRE_VALGRIND")
    report = tmp_path / "instructions.json"
    out = io.StringIO()
    result = cli.run(["instructions", "--clients", "20", "--senders", "2", "--rate", "10",
                      "--warmup-messages", "5", "--seconds", "3", "--runs", "2",
                      "--valgrind", valgrind, "--json", str(report)],
                     out=out, err=io.StringIO())
    summary = json.loads(report.read_text())
    assert summary == json.loads(json.dumps(result.summary))
    runs = summary["runs"]
    assert len({found["pid"] for found in runs}) == 2  # a fresh relay each time
    for found in runs:
        with pytest.raises(ProcessLookupError):
            os.kill(found["pid"], 0)
        assert found["messages"] >= 10  # about 30 in 3 s at 10 messages/s
        assert found["deliveries"] == found["messages"] * 19
        # A delivery is a few thousand instructions (3,900 in one room of 200); the
        # whole process's start-up would be hundreds of millions.
        assert 500 < found["instructions_per_delivery"] < 200_000, found
    assert "instructions per delivery, 1 room x 20, 2 senders" in out.getvalue()


def test_instructions_stops_its_relay_when_terminated():
    """SIGTERM to the command while it measures: the relay under valgrind (in a session
    of its own, so the signal does not reach it) is stopped on the way out."""
    import select
    import signal

    from tests.cluster_harness import binary

    valgrind = binary("valgrind", "IWRELAY_REQUIRE_VALGRIND")
    command = subprocess.Popen(
        [sys.executable, "-m", "iw_relay.bench", "instructions", "--clients", "4",
         "--senders", "1", "--seconds", "600", "--valgrind", valgrind],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    try:
        # The command names its relay once it has started it.
        assert select.select([command.stderr], [], [], 60)[0], "no line from the command"
        line = command.stderr.readline().decode()
        found = re.search(r"relay pid (\d+) starting", line)
        assert found, line
        relay = int(found.group(1))
        os.kill(relay, 0)  # running
        command.send_signal(signal.SIGTERM)
        command.wait(timeout=60)
        with pytest.raises(ProcessLookupError):
            os.kill(relay, 0)
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
