"""IWRelaySocket (iw_relay/static/client.js) in a real headless Chromium against a real
`twistd iwrelay`, with recovery off (today's relay) and on (``--recovery-window``),
with a cutting TCP proxy in between.

The page comes from a test-only twisted.web Site (tests/page_server.py) that serves
client.js through the relay's own resource. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import re
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.browser import TIMEOUT_MS, Relay, chromium, launched_chromium, open_page
from tests.cutting_proxy import CuttingProxy
from tests.page_server import PageServer


@contextmanager
def browser_and_relay(relay: Relay, init_script: str = ""):
    """(browser, page server, relay, proxy in front of the relay); every page the
    browser opens runs `init_script` first."""
    pages = PageServer()
    proxy = CuttingProxy(relay.port)
    try:
        with launched_chromium() as browser:
            if init_script:
                original = browser.new_context

                def new_context(**kwargs):
                    context = original(**kwargs)
                    context.add_init_script(init_script)
                    return context

                browser.new_context = new_context
            yield browser, pages, relay, proxy
    finally:
        proxy.stop()
        pages.stop()
        relay.kill()


@pytest.fixture
def world(tmp_path):
    """(browser, page server, relay, proxy in front of the relay)."""
    chromium()  # skip before starting anything
    with browser_and_relay(Relay(tmp_path)) as world:
        yield world


# The same scenario, run with the browser's WebSocket and with IWRelaySocket: what the
# application can observe must be the same.
SCENARIO = """
async ([className, base]) => {
  const C = window[className];
  const log = [];
  const wait = (check, what) => new Promise((resolve, reject) => {
    const started = performance.now();
    const poll = () => {
      const value = check();
      if (value) return resolve(value);
      if (performance.now() - started > 10000) return reject(new Error("timeout: " + what));
      setTimeout(poll, 10);
    };
    poll();
  });
  const url = base + "/room/plain-" + className;
  const a = new C(url);
  log.push(["constants", C.CONNECTING, C.OPEN, C.CLOSING, C.CLOSED, a.CONNECTING, a.CLOSED]);
  log.push(["initial", a.readyState, a.url === url, a.binaryType, a.bufferedAmount,
            a.protocol, a.extensions, a instanceof EventTarget]);
  try { a.send("x"); log.push("sent while connecting"); } catch (e) { log.push(["send", e.name]); }
  a.addEventListener("open", () => log.push(["listener open", a.readyState]));
  a.onopen = (event) => log.push(["onopen", a.readyState, event.type, event.target === a]);
  a.addEventListener("open", () => log.push(["second listener open"]));
  const got = [];
  a.onmessage = (event) => got.push(JSON.parse(event.data));
  a.addEventListener("message", (event) => log.push(["message", typeof event.data,
                                                     event.origin === base]));
  await wait(() => got.length, "a's connected");
  log.push(["connected", got[0].type, Object.keys(got[0]).sort().join(",")]);
  a.binaryType = "arraybuffer";
  a.binaryType = "nonsense";
  log.push(["binaryType", a.binaryType]);
  const b = new C(url);
  const bGot = [];
  b.onmessage = (event) => bGot.push(JSON.parse(event.data));
  await wait(() => bGot.length, "b's connected");
  await wait(() => got.length >= 2, "user-joined");
  log.push(["a sees", got[1].type, got[1].connectionId === bGot[0].connectionId]);
  a.send(JSON.stringify({ type: "op", n: 1 }));
  a.send(new TextEncoder().encode(JSON.stringify({ type: "op", n: 2 })));
  await wait(() => bGot.length >= 3, "b gets both");
  log.push(["b gets", bGot[1].n, bGot[2].n, bGot[1].connectionId === got[0].connectionId]);
  for (const code of [1001, 2000, 5000]) {
    try { a.close(code); log.push(["closed with", code]); } catch (e) {
      log.push(["close", code, e.name]);
    }
  }
  try { a.close(4000, "x".repeat(124)); } catch (e) { log.push(["long reason", e.name]); }
  a.onclose = (event) => log.push(["onclose", event.code, event.reason, event.wasClean,
                                   a.readyState, event instanceof CloseEvent]);
  const closed = new Promise((resolve) => a.addEventListener("close", resolve));
  a.onerror = () => log.push(["onerror"]);
  a.close(4000, "bye");
  log.push(["closing", a.readyState]);
  await closed;
  a.send("after close");
  log.push(["after close", a.readyState]);
  await wait(() => bGot.length >= 4, "user-left");
  log.push(["b sees", bGot[3].type, bGot[3].connectionId === got[0].connectionId]);
  b.close();
  // A failed connection: error then close 1006, as with the browser's WebSocket.
  const dead = new C(base.replace(/:\\d+$/, ":9") + "/room/x");
  const ends = [];
  dead.onerror = () => ends.push("error");
  await new Promise((resolve) => {
    dead.onclose = (event) => { ends.push(["close", event.code, event.wasClean]); resolve(); };
  });
  log.push(["refused", ends, dead.readyState]);
  try { new C("http://127.0.0.1:9/x#frag"); } catch (e) { log.push(["fragment", e.name]); }
  try { new C("ftp://127.0.0.1:9/x"); } catch (e) { log.push(["scheme", e.name]); }
  return log;
}
"""


def test_iwrelaysocket_behaves_like_a_plain_websocket(world):
    browser, pages, relay, _ = world
    page = open_page(browser, pages)
    base = f"ws://127.0.0.1:{relay.port}"
    plain = page.evaluate(SCENARIO, ["WebSocket", base])
    ours = page.evaluate(SCENARIO, ["IWRelaySocket", base])
    assert ours == plain, "\n".join(map(str, [*ours, "---", *plain]))
    # The scenario saw what it meant to see (it is not two empty logs).
    assert ["send", "InvalidStateError"] in plain
    assert ["onclose", 1000, "", True, 3, True] in plain  # the relay answers 1000
    assert ["b gets", 1, 2, True] in plain
    assert page.errors == []


def test_window_websocket_can_be_replaced_before_the_app_runs(world):
    """The one-line adoption: ``window.WebSocket = IWRelaySocket``."""
    browser, pages, relay, _ = world
    page = open_page(browser, pages)
    result = page.evaluate("""async (base) => {
      window.WebSocket = IWRelaySocket;
      const ws = new WebSocket(base + "/room/replaced");
      const first = await new Promise((resolve) => {
        ws.onmessage = (e) => resolve(JSON.parse(e.data));
      });
      const state = [ws instanceof IWRelaySocket, WebSocket.OPEN, ws.readyState, first.type];
      ws.close();
      return state;
    }""", f"ws://127.0.0.1:{relay.port}")
    assert result == [True, 1, 1, "connected"]


def test_client_js_is_served_with_its_headers(world):
    browser, pages, _, _ = world
    page = browser.new_context().new_page()
    response = page.goto(pages.url + "client.js")
    headers = response.headers
    assert response.status == 200
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff"
    assert re.fullmatch(r'"[0-9a-f]{32}"', headers["etag"])
    assert "max-age" in headers["cache-control"]


RECORD = """
([base, room]) => {
  window.events = [];
  window.messages = [];
  window.sockets = [];
  window.connect = () => {
    const socket = new IWRelaySocket(base + "/room/" + room);
    window.sockets.push(socket);
    socket.onopen = () => window.events.push(["open", socket.readyState]);
    socket.onclose = (e) => window.events.push(["close", e.code, e.wasClean, socket.readyState]);
    socket.onerror = () => window.events.push(["error"]);
    socket.onmessage = (e) => window.messages.push(JSON.parse(e.data));
    return socket;
  };
  window.socket = window.connect();
}
"""


def connected_ids(page) -> list[str]:
    return page.evaluate("window.messages.filter((m) => m.type === 'connected')"
                         ".map((m) => m.connectionId)")


def test_after_a_cut_it_reconnects_and_without_recovery_shows_close_then_open(world):
    """Against a relay without recovery, a cut is a failed recovery: the application
    sees close then open, and the relay's new ``connected``; the peer sees the old member
    leave and the new one join."""
    browser, pages, relay, proxy = world
    cut_page, peer_page = open_page(browser, pages), open_page(browser, pages)
    cut_page.evaluate(RECORD, [f"ws://127.0.0.1:{proxy.port}", "cut-room"])
    cut_page.wait_for_function("window.messages.length === 1")
    peer_page.evaluate(RECORD, [f"ws://127.0.0.1:{relay.port}", "cut-room"])
    peer_page.wait_for_function("window.messages.length === 1")
    first_id = connected_ids(cut_page)[0]
    # A plain WebSocket through the same proxy, for what a cut looks like to an app.
    cut_page.evaluate("""(url) => {
      window.plainEvents = [];
      const plain = new WebSocket(url);
      plain.onopen = () => window.plainEvents.push(["open", plain.readyState]);
      plain.onerror = () => window.plainEvents.push(["error"]);
      plain.onclose = (e) => window.plainEvents.push(["close", e.code, e.wasClean,
                                                      plain.readyState]);
    }""", f"ws://127.0.0.1:{proxy.port}/room/other-room")
    cut_page.wait_for_function("window.plainEvents.length === 1")
    proxy.cut(refuse_for=2.0)
    cut_page.wait_for_function("window.events.some((e) => e[0] === 'close')")
    assert proxy.refusing()  # the close came at once, while the proxy still refuses
    plain_events = cut_page.evaluate("window.plainEvents")
    assert plain_events[-1] == ["close", 1006, False, 3], plain_events
    cut_page.wait_for_function(
        "window.messages.filter((m) => m.type === 'connected').length === 2")
    events = cut_page.evaluate("window.events")
    # As the plain WebSocket saw the cut, then the same object opens again.
    assert events == [*plain_events, ["open", 1]], events
    second_id = connected_ids(cut_page)[1]
    assert second_id != first_id
    assert proxy.refused >= 1 or proxy.accepted >= 2
    peer_page.wait_for_function("window.messages.length >= 3")
    seen = peer_page.evaluate("window.messages.slice(1).map((m) => [m.type, m.connectionId])")
    assert ["user-left", first_id] in seen and ["user-joined", second_id] in seen
    # It works as before: both directions.
    cut_page.evaluate("window.socket.send(JSON.stringify({type: 'op', n: 'after'}))")
    peer_page.wait_for_function("window.messages.some((m) => m.n === 'after')")
    peer_page.evaluate("window.socket.send(JSON.stringify({type: 'op', n: 'back'}))")
    cut_page.wait_for_function("window.messages.some((m) => m.n === 'back')")
    assert relay.stats()["currentConnections"] == 2
    assert cut_page.errors == [] and peer_page.errors == []


def test_an_apps_own_reconnect_loop_leaves_no_ghost(world):
    """Impossible Writer reconnects by itself on close: a new socket to the same URL.
    The old one steps aside instead of reopening, so the room keeps two members."""
    browser, pages, relay, proxy = world
    cut_page, peer_page = open_page(browser, pages), open_page(browser, pages)
    cut_page.evaluate(RECORD, [f"ws://127.0.0.1:{proxy.port}", "ghost-room"])
    cut_page.wait_for_function("window.messages.length === 1")
    cut_page.evaluate("""() => {
      const appConnect = () => {
        const socket = window.connect();
        socket.onclose = () => {
          window.events.push(["app reconnects"]);
          setTimeout(() => { window.socket = appConnect(); }, 300);
        };
        return socket;
      };
      window.socket.close();
      window.socket = appConnect();
    }""")
    cut_page.wait_for_function("window.messages.length === 2")
    peer_page.evaluate(RECORD, [f"ws://127.0.0.1:{relay.port}", "ghost-room"])
    peer_page.wait_for_function("window.messages.length === 1")
    for _ in range(3):
        before = cut_page.evaluate("window.sockets.length")
        proxy.cut(refuse_for=1.0)
        cut_page.wait_for_function(f"window.sockets.length > {before} && "
                                   "window.sockets.at(-1).readyState === 1")
    # The relay's count settles at two members: no ghost left behind.
    deadline = time.monotonic() + 10
    while relay.stats()["currentConnections"] != 2:
        assert time.monotonic() < deadline, relay.stats()
        peer_page.wait_for_timeout(50)  # polling the relay's /stats, bounded
    states = cut_page.evaluate("window.sockets.map((s) => s.readyState)")
    assert states[:-1] == [3] * (len(states) - 1) and states[-1] == 1
    assert cut_page.errors == []


COUNT_SOCKETS = """
window.socketsMade = 0;
const Native = window.WebSocket;
window.WebSocket = class extends Native {
  constructor(...args) { super(...args); window.socketsMade += 1; }
};
"""


def cut_off_page_on_a_fake_clock(world, room: str):
    """A page counting its sockets, on Playwright's fake clock, joined to `room` through
    the proxy, then cut off (new connections refused for 30 s) until it saw the close."""
    browser, pages, _, proxy = world
    page = browser.new_context().new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.add_init_script(COUNT_SOCKETS)
    page.clock.install()
    page.goto(pages.url)
    page.evaluate(RECORD, [f"ws://127.0.0.1:{proxy.port}", room])
    page.wait_for_function("window.messages.length === 1")
    proxy.cut(refuse_for=30.0)
    page.wait_for_function("window.events.some((e) => e[0] === 'close')")
    return page


def test_closing_while_it_reconnects_stops_it(world):
    """Time in the page is Playwright's fake clock: the backoff is run through, not
    waited for."""
    page = cut_off_page_on_a_fake_clock(world, "stop-room")
    page.clock.run_for(20_000)  # reconnect attempts, all refused by the proxy
    page.wait_for_function("window.socketsMade >= 3")
    page.evaluate("window.socket.close()")  # the app gives up: no reopening
    made = page.evaluate("window.socketsMade")
    page.clock.run_for(120_000)
    assert page.evaluate("window.socketsMade") == made
    assert page.evaluate("window.socket.readyState") == 3
    assert [e[0] for e in page.evaluate("window.events")] == ["open", "close"]


def test_reconnect_backoff_grows_with_jitter_and_is_capped(world):
    page = cut_off_page_on_a_fake_clock(world, "backoff-room")
    made = [page.evaluate("window.socketsMade")]
    for _ in range(8):  # 8 s of page time: 250 ms doubling, capped at 10 s
        page.clock.run_for(1_000)
        made.append(page.evaluate("window.socketsMade"))
    attempts = made[-1] - made[0]
    assert 3 <= attempts <= 7, made  # 125-250, 250-500, 500-1000, 1-2 s, 2-4 s ...
    page.evaluate("window.socket.close()")


# -- the resume path, against the real relay with --recovery-window --------------------

# Test-only: the page's native WebSocket asks to resume from OVERLAP seqs further back
# than IWRelaySocket said (as a cluster node that subscribes before it reads history
# may replay): the relay then sends frames the page already has, which it must drop.
OVERLAP_SCRIPT = """
(() => {
  const Native = window.WebSocket;
  const Wrapped = function (url, protocols) {
    const extra = window.__overlap || 0;
    const parsed = new URL(url, location.href);
    const since = parsed.searchParams.get("since");
    if (extra && since !== null) {
      parsed.searchParams.set("since", String(Math.max(0, Number(since) - extra)));
      url = parsed.href;
    }
    return protocols === undefined ? new Native(url) : new Native(url, protocols);
  };
  Wrapped.prototype = Native.prototype;
  for (const name of ["CONNECTING", "OPEN", "CLOSING", "CLOSED"]) Wrapped[name] = Native[name];
  window.WebSocket = Wrapped;
})();
"""


def recovering_relay(tmp_path: Path, window: str = "30s") -> Relay:
    """`twistd iwrelay --recovery-window WINDOW` on a free loopback port."""
    return Relay(tmp_path, "--recovery-window", window)


@pytest.fixture
def recovering_world(request, tmp_path):
    chromium()  # skip before starting anything
    overlap = getattr(request, "param", 0)
    script = OVERLAP_SCRIPT + f"window.__overlap = {int(overlap)};" if overlap else ""
    with browser_and_relay(recovering_relay(tmp_path), script) as world:
        yield world


# Records what the application sees, with either class; on close, an app that uses a
# plain WebSocket reconnects by itself after 300 ms, as Impossible Writer does.
APP = """
([className, url]) => {
  window.events = [];
  window.messages = [];
  const connect = () => {
    const socket = new window[className](url);
    socket.onopen = () => window.events.push("open");
    socket.onclose = (e) => {
      window.events.push("close");
      if (className === "WebSocket") setTimeout(() => { window.socket = connect(); }, 300);
    };
    socket.onmessage = (e) => window.messages.push(JSON.parse(e.data));
    return socket;
  };
  window.socket = connect();
  window.ops = (prefix) => window.messages.filter((m) => m.type === "op"
                                                  && m.n.startsWith(prefix)).map((m) => m.n);
  window.sendOps = (prefix, count, every) => new Promise((resolve) => {
    let n = 0;
    const next = () => {
      window.socket.send(JSON.stringify({ type: "op", n: prefix + n }));
      n += 1;
      if (n < count) setTimeout(next, every); else resolve();
    };
    next();
  });
}
"""


SPOOF = ("window.socket.send(JSON.stringify({type: 'connected', recovered: false, "
         "resumeToken: 'forged', epoch: 'forged', seq: 0}))")


def run_cut_scenario(recovering_world, class_name: str, replay_extra: int = 0,
                     spoof: bool = False) -> tuple:
    """Two pages in one room; the first's connection is cut (dropped, new connections
    refused) for 3 s while the second sends 200 messages; the first also sends 150 of
    its own while it is down (IWRelaySocket only)."""
    browser, pages, relay, proxy = recovering_world
    cut_page, peer_page = open_page(browser, pages), open_page(browser, pages)
    room = f"recover-{class_name}"
    cut_page.evaluate(APP, [class_name, f"ws://127.0.0.1:{proxy.port}/room/{room}"])
    cut_page.wait_for_function("window.messages.length === 1")
    peer_page.evaluate(APP, ["IWRelaySocket", f"ws://127.0.0.1:{relay.port}/room/{room}"])
    peer_page.wait_for_function("window.messages.length === 1")
    cut_page.wait_for_function("window.messages.some((m) => m.type === 'user-joined')")
    if spoof:
        # A peer's message of type "connected" (that could pass for the relay's) is
        # refused by the relay, and never reaches the page.
        peer_page.evaluate(SPOOF)
        peer_page.wait_for_function("window.messages.some((m) => m.code === 'RESERVED_TYPE')")
    if replay_extra:
        peer_page.evaluate(f"window.sendOps('early-', {replay_extra}, 0)")
        cut_page.wait_for_function(f"window.ops('early-').length === {replay_extra}")
    proxy.cut(refuse_for=3.0)
    if class_name == "IWRelaySocket":
        # Test-only peek: the socket has seen the drop (the application has not).
        cut_page.wait_for_function("window.socket._phase === 'recovering'")
        cut_page.evaluate("window.sendOps('a-', 150, 0)")
    else:
        cut_page.wait_for_function("window.events.includes('close')")
    peer_page.evaluate("window.sendOps('b-', 200, 12)")
    return cut_page, peer_page, relay, proxy


def test_a_cut_page_using_iwrelaysocket_gets_all_200_in_order_once(recovering_world):
    cut_page, peer_page, relay, proxy = run_cut_scenario(recovering_world, "IWRelaySocket",
                                                         spoof=True)
    cut_page.wait_for_function("window.ops('b-').length >= 200", timeout=40_000)
    peer_page.wait_for_function("window.ops('a-').length >= 150", timeout=40_000)
    assert proxy.refused >= 1  # it really was kept out for a while
    assert cut_page.evaluate("window.ops('b-')") == [f"b-{n}" for n in range(200)]
    assert peer_page.evaluate("window.ops('a-')") == [f"a-{n}" for n in range(150)]
    # Invisible to both applications: no close, no second open, no user-left/-joined.
    assert cut_page.evaluate("window.events") == ["open"]
    assert peer_page.evaluate("window.events") == ["open"]
    kinds = peer_page.evaluate("window.messages.map((m) => m.type)")
    assert "user-left" not in kinds and kinds.count("user-joined") == 0
    connected = cut_page.evaluate("window.messages.filter((m) => m.type === 'connected')")
    # The relay's first only: the peer's spoof was refused, the recovered "connected"
    # is not shown.
    assert len(connected) == 1 and connected[0]["recovered"] is False
    # The flush of 150 queued messages stayed under the relay's 100/s.
    stats = relay.stats()
    assert stats["rateLimitsHit"] == 0
    assert stats["recoveriesSucceeded"] >= 1 and stats["currentConnections"] == 2
    assert cut_page.errors == [] and peer_page.errors == []


# Test-only: the browser's socket as it is between the relay's close frame (a node
# stopping in a rolling restart) and the close event, once `__closing` is set: CLOSING,
# and what is sent is discarded.
CLOSING_SCRIPT = """
(() => {
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) { super(...args); window.lastNativeSocket = this; }
    get readyState() { return this.__closing ? Native.CLOSING : super.readyState; }
    send(data) { if (!this.__closing) super.send(data); }
  };
})();
"""


def test_what_is_sent_while_the_relay_closes_the_connection_is_sent_after_the_resume(
        recovering_world):
    browser, pages, relay, proxy = recovering_world
    room = "closing-room"
    context = browser.new_context()
    context.add_init_script(CLOSING_SCRIPT)
    page = context.new_page()
    page.goto(pages.url)
    page.evaluate(APP, ["IWRelaySocket", f"ws://127.0.0.1:{proxy.port}/room/{room}"])
    page.wait_for_function("window.messages.length === 1")
    peer = open_page(browser, pages)
    peer.evaluate(APP, ["IWRelaySocket", f"ws://127.0.0.1:{relay.port}/room/{room}"])
    peer.wait_for_function("window.messages.length === 1")
    page.evaluate("""() => {
      window.lastNativeSocket.__closing = true;
      window.socket.send(JSON.stringify({ type: "op", n: "while-closing" }));
    }""")
    proxy.cut()  # and then the connection ends
    page.wait_for_function("window.socket._phase === 'live' && "
                           "window.lastNativeSocket.url.includes('resume=')")
    page.evaluate("window.sendOps('after', 1, 0)")
    peer.wait_for_function("window.ops('after').length === 1")
    assert peer.evaluate("window.ops('')") == ["while-closing", "after0"]
    assert page.evaluate("window.events") == ["open"]
    assert relay.stats()["recoveriesSucceeded"] == 1


def test_on_server_shutdown_it_leaves_at_once_so_that_the_relay_drains_quickly(tmp_path):
    """A stopping relay says server-shutdown and waits (--drain-timeout) for its members
    to leave; what they sent until then is relayed. IWRelaySocket leaves at once (and
    resumes elsewhere): the relay stops long before its drain timeout, and what the
    application sends meanwhile waits for the resume."""
    chromium()  # skip before starting anything
    relay = Relay(tmp_path, "--recovery-window", "30s", "--drain-timeout", "20s")
    with browser_and_relay(relay) as (browser, pages, _, _):
        page = open_page(browser, pages)
        page.evaluate(APP, ["IWRelaySocket", f"ws://127.0.0.1:{relay.port}/room/draining"])
        page.wait_for_function("window.messages.length === 1")
        relay.process.send_signal(signal.SIGTERM)
        assert relay.process.wait(10) == 0  # not the 20 s drain: it left
        page.wait_for_function("window.socket._phase === 'recovering'")
        page.evaluate("window.sendOps('later', 1, 0)")
        assert page.evaluate("window.socket.bufferedAmount") > 0
        assert page.evaluate("window.events") == ["open"]


def test_the_same_cut_with_a_plain_websocket_loses_messages(recovering_world):
    cut_page, peer_page, _, _ = run_cut_scenario(recovering_world, "WebSocket")
    cut_page.wait_for_function("window.events.filter((e) => e === 'open').length === 2",
                               timeout=40_000)
    # Once the plain page is back (as a new member), a marker message: everything the
    # peer sent before it and while the page was away is lost for the page.
    peer_page.wait_for_function("window.messages.filter((m) => m.type === 'user-joined')"
                                ".length === 1")
    peer_page.evaluate("window.sendOps('c-', 1, 0)")
    cut_page.wait_for_function("window.ops('c-').length === 1")
    received = cut_page.evaluate("window.ops('b-')")
    assert len(received) < 200
    # The peer sees a second member join; the old one stays "away" for the window,
    # since the relay cannot tell a plain client's drop from a resumable one.
    ids = cut_page.evaluate("window.messages.filter((m) => m.type === 'connected')"
                            ".map((m) => m.connectionId)")
    assert len(set(ids)) == 2


@pytest.mark.parametrize("recovering_world", [5], indirect=True)
def test_duplicates_are_dropped_by_seq(recovering_world):
    """The resume asks for 5 seqs further back than IWRelaySocket said (OVERLAP_SCRIPT):
    the relay sends frames the page already has, and it must not show them again."""
    cut_page, _, _, _ = run_cut_scenario(recovering_world, "IWRelaySocket",
                                         replay_extra=5)
    cut_page.wait_for_function("window.ops('b-').length >= 200", timeout=40_000)
    assert cut_page.evaluate("window.ops('early-')") == [f"early-{n}" for n in range(5)]
    assert cut_page.evaluate("window.ops('b-')") == [f"b-{n}" for n in range(200)]
    seqs = cut_page.evaluate("window.messages.filter((m) => 'seq' in m).map((m) => m.seq)")
    assert seqs == sorted(set(seqs))


def test_a_failed_recovery_shows_close_then_open_and_a_fresh_connected(tmp_path):
    """The window (0.5 s) passes while the page is cut off: the relay answers the resume
    with a fresh join (recovered: false); the application sees close, open, and the new
    "connected", and what it sent while down belonged to the lost session (dropped)."""
    chromium()  # skip before starting anything
    with browser_and_relay(recovering_relay(tmp_path, "0.5s")) as (browser, pages, relay, proxy):
        page, peer = open_page(browser, pages), open_page(browser, pages)
        url = f"ws://127.0.0.1:{proxy.port}/room/failing"
        page.evaluate(APP, ["IWRelaySocket", url])
        page.wait_for_function("window.messages.length === 1")
        peer.evaluate(APP, ["IWRelaySocket",
                            f"ws://127.0.0.1:{relay.port}/room/failing"])
        peer.wait_for_function("window.messages.length === 1")
        page.evaluate("""() => { window.recoveries = [];
          window.socket.addEventListener("recovery",
            (e) => window.recoveries.push(e.detail.recovered)); }""")
        proxy.cut(refuse_for=2.0)
        page.wait_for_function("window.socket._phase === 'recovering'")
        page.evaluate("window.sendOps('lost-', 3, 0)")
        page.wait_for_function("window.events.length === 3", timeout=30_000)
        assert page.evaluate("window.events") == ["open", "close", "open"]
        assert page.evaluate("window.recoveries") == [False]
        connected = page.evaluate(
            "window.messages.filter((m) => m.type === 'connected')")
        assert len(connected) == 2 and connected[1]["recovered"] is False
        assert connected[1]["connectionId"] != connected[0]["connectionId"]
        assert page.evaluate("window.socket.readyState") == 1
        page.evaluate("window.sendOps('new-', 1, 0)")
        peer.wait_for_function("window.ops('new-').length === 1")
        assert peer.evaluate("window.ops('lost-')") == []
        kinds = peer.evaluate("window.messages.map((m) => m.type)")
        assert kinds.count("user-left") == 1  # the old member, after its window
        assert relay.stats()["recoveriesFailed"] == {"session_ended": 1}


def test_the_demo_page_uses_iwrelaysocket_and_shows_it_recovered(tmp_path):
    """/demo, loaded through the cutting proxy from a relay with recovery on: a cut is
    recovered (the page says so) and counted by the relay."""
    from playwright.sync_api import expect

    chromium()  # skip before starting anything
    relay = Relay(tmp_path, "--demo", "--recovery-window", "30s")
    with browser_and_relay(relay) as (browser, _, _, proxy):
        cut = browser.new_context().new_page()
        cut.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        cut.on("pageerror", lambda error: errors.append(str(error)))
        cut.goto(f"http://127.0.0.1:{proxy.port}/demo#demo-recovery")
        # (the page's CSP forbids eval: no string predicates here)
        expect(cut.locator("#recovery")).to_have_text("on", timeout=TIMEOUT_MS)
        assert cut.evaluate("typeof IWRelaySocket") == "function"
        proxy.cut(refuse_for=2.0)
        expect(cut.locator("#recovery")).to_have_text("recovered after a drop",
                                                      timeout=30_000)
        assert "recovered" in cut.locator("#log").text_content()
        assert relay.stats()["recoveriesSucceeded"] == 1
        assert errors == []
