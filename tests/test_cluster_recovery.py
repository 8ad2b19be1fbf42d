"""Connection recovery across a cluster, end to end: Chromium pages using IWRelaySocket,
Debian's haproxy with conf/haproxy.cfg, three `twistd -n iwrelay --redis
--recovery-window` nodes and a redis-server (tests/cluster_harness.py), under steady
traffic:

- the node a page is on is killed (SIGKILL): the page resumes on another node with
  ``recovered: true``, every message in order, once, and its peer (on another node)
  sees no ``user-left``; both when it resumes at once and when it is kept out until the
  other nodes have found the node dead;
- every node is stopped (SIGTERM, the graceful drain) and started again, one after the
  other: the pages lose and repeat nothing of what the other sent.

Loopback only; every wait polls a condition up to a deadline.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser import chromium, launched_chromium, open_page
from tests.cluster_harness import Cluster, Node, get, poll
from tests.cutting_proxy import CuttingProxy
from tests.page_server import PageServer

# A stopping node drains for up to 10 s: its members leave on server-shutdown, and what
# they sent before is relayed (docs/scaling.rst, "The HAProxy deployment").
RECOVERY = ("--recovery-window", "30s", "--node-heartbeat", "0.5s", "--drain-timeout", "10s")
SEND_EVERY_MS = 25  # 40 messages a second from each page, under the relay's 100/s
RESUME_MS = 30_000

# The application: an IWRelaySocket that records what the app sees, and sends a numbered
# "op" every `every` ms from startSending() until stopSending() (which returns how many).
APP = """
(url) => {
  window.events = [];
  window.messages = [];
  window.recoveries = [];
  const socket = new IWRelaySocket(url);
  socket.onopen = () => window.events.push("open");
  socket.onclose = (e) => window.events.push("close " + e.code);
  socket.onmessage = (e) => window.messages.push(JSON.parse(e.data));
  socket.addEventListener("recovery", (e) => window.recoveries.push(e.detail.recovered));
  window.socket = socket;
  window.sent = 0;
  window.ops = () => window.messages.filter((m) => m.type === "op").map((m) => m.n);
  window.kinds = () => window.messages.map((m) => m.type);
  window.startSending = (every) => {
    window.sender = setInterval(() => {
      socket.send(JSON.stringify({ type: "op", n: window.sent }));
      window.sent += 1;
    }, every);
  };
  window.stopSending = () => { clearInterval(window.sender); return window.sent; };
}
"""


@pytest.fixture
def browser():
    chromium()  # skip before starting anything
    pages = PageServer()
    try:
        with launched_chromium() as launched:
            yield launched, pages
    finally:
        pages.stop()


@pytest.fixture
def cluster(tmp_path: Path):
    started = Cluster(tmp_path, *RECOVERY)
    yield started
    started.close()


def join(browser, url: str):
    """A page running APP on `url`, once the relay's "connected" is in."""
    page = open_page(*browser)
    page.evaluate(APP, url)
    page.wait_for_function("window.messages.length === 1")
    assert page.evaluate("window.messages[0].type") == "connected"
    return page


def node_with_connections(cluster: Cluster, count: int) -> Node:
    """The one node with `count` connections (the others have none)."""
    def found() -> list[int] | None:
        connections = cluster.connections()
        return connections if sorted(connections) == [0] * (len(connections) - 1) + [
            count] else None

    return cluster.nodes[poll(found, f"{count} connections on one node").index(count)]


def wait_for(page, condition: str, sent: int = 0) -> None:
    """Wait (up to RESUME_MS) for a JavaScript condition; on timeout, say what the page
    has."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(condition, timeout=RESUME_MS)
    except PlaywrightTimeout:
        raise AssertionError(f"no {condition} in {RESUME_MS} ms: " + str(page.evaluate(
            "[window.events, window.recoveries, window.sent, window.ops().length, "
            "window.ops().slice(-3), window.kinds().filter((k) => k !== 'op'), "
            "window.socket._phase, window.socket.bufferedAmount]"))
            + f" missing: {sorted(set(range(sent)) - set(page.evaluate('window.ops()')))}"
            ) from None


def received_progress(page, more: int) -> None:
    """Wait until `page` has `more` ops beyond what it has now: traffic flows."""
    have = page.evaluate("window.ops().length")
    wait_for(page, f"window.ops().length >= {have + more}")


def assert_all_once_in_order(page, sent: int) -> None:
    wait_for(page, f"window.ops().length >= {sent}", sent)
    assert page.evaluate("window.ops()") == list(range(sent))


@pytest.mark.parametrize("kept_out", [False, True],
                         ids=["resumes-at-once", "resumes-after-the-death-is-found"])
def test_a_page_whose_node_is_killed_resumes_on_another_with_nothing_missing(
        cluster, browser, kept_out):
    """The page reaches HAProxy through a cutting proxy: with `kept_out`, its reconnects
    are refused until the other nodes have found its node dead (and could have said
    user-left); otherwise it resumes as soon as it can."""
    with CuttingProxy(cluster.front.port) as proxy:
        receiver = join(browser, f"ws://127.0.0.1:{proxy.port}/room/killed-node-room")
        home = node_with_connections(cluster, 1)
        # The sender on another node, directly: it stays up while the receiver's dies.
        other = next(node for node in cluster.nodes if node is not home)
        sender = join(browser, f"ws://127.0.0.1:{other.port}/room/killed-node-room")
        receiver.wait_for_function("window.kinds().includes('user-joined')")
        sender.evaluate(f"window.startSending({SEND_EVERY_MS})")
        received_progress(receiver, 20)

        home.kill()
        if kept_out:
            proxy.cut(refuse_for=30)
            poll(lambda: other.stats()["cluster"]["deadNodesSeen"] == 1,
                 "the sender's node to find the dead node")
            proxy.cut(refuse_for=0)  # let it in
        wait_for(receiver, "window.recoveries.length >= 1")
        received_progress(receiver, 20)  # live again, on a survivor
        sent = sender.evaluate("window.stopSending()")

        assert_all_once_in_order(receiver, sent)
        recoveries = receiver.evaluate("window.recoveries")
        assert set(recoveries) == {True}, recoveries
        # Invisible to both applications: no close, no second open, no one left or joined.
        assert receiver.evaluate("window.events") == ["open"]
        assert sender.evaluate("window.events") == ["open"]
        assert sender.evaluate("window.kinds()").count("user-left") == 0
        assert sender.evaluate("window.kinds()").count("user-joined") == 0
        survivors = [node for node in cluster.nodes if node is not home]
        assert sum(node.stats()["recoveriesSucceeded"] for node in survivors) == len(recoveries)
        assert sum(cluster.connections()) == 2 and not home.alive()
        assert receiver.errors == [] and sender.errors == []


def test_a_rolling_restart_of_every_node_loses_and_repeats_nothing(cluster, browser):
    url = cluster.url("/room/rolling-restart-room")
    first, second = join(browser, url), join(browser, url)
    first.wait_for_function("window.kinds().includes('user-joined')")
    node_with_connections(cluster, 2)  # HAProxy put the room on one node
    for page in (first, second):
        page.evaluate(f"window.startSending({SEND_EVERY_MS})")
    received_progress(first, 20)

    for node in cluster.nodes:
        assert node.stop() == 0
        cluster.wait_out_of_rotation(node)
        cluster.restart(node)
        for page in (first, second):
            received_progress(page, 20)  # traffic flows again both ways

    sent = [page.evaluate("window.stopSending()") for page in (first, second)]
    assert_all_once_in_order(first, sent[1])
    assert_all_once_in_order(second, sent[0])
    for page in (first, second):
        # Each was on a node that restarted, at least once, and always came back as itself.
        recoveries = page.evaluate("window.recoveries")
        assert recoveries and set(recoveries) == {True}, recoveries
        assert page.evaluate("window.events") == ["open"]
        assert page.evaluate("window.kinds()").count("user-left") == 0
        assert page.errors == []
    assert second.evaluate("window.kinds()").count("user-joined") == 0
    assert first.evaluate("window.kinds()").count("user-joined") == 1


def test_the_harness_restarts_a_node_on_its_port_and_haproxy_follows(tmp_path):
    """The cluster without recovery: a stopped node leaves HAProxy's rotation and comes
    back UP on its port once started again; a killed one leaves it too, and HAProxy then
    serves from the others."""
    plain = Cluster(tmp_path)
    try:
        node, victim = plain.nodes[0], plain.nodes[1]
        port = node.port
        assert node.stop() == 0
        plain.wait_out_of_rotation(node)
        plain.restart(node)
        assert node.port == port and len(node.runs) == 2
        victim.kill()
        plain.wait_out_of_rotation(victim)
        assert plain.front.states()["node1"] == "DOWN"
        assert plain.connections() == [0, 0, 0]
        assert {get(plain.front.port, "/health")[0] for _ in range(6)} == {200}
    finally:
        plain.close()
