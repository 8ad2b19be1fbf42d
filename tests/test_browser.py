"""The demo page in a real headless Chromium: two pages join one room through a real
`twistd iwrelay --demo` process, signal an RTCPeerConnection through the relay, and
share text over its data channel. Loopback only.

Needs Debian's chromium and the `playwright` Python package (never `playwright install`:
the system's browser is driven). Without them the tests are skipped, unless
IWRELAY_REQUIRE_BROWSER is set (CI sets it), in which case they fail.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.browser import CHROMIUM_ARGS, TIMEOUT_MS, Relay, chromium
from tests.turn_process import TurnServer


def share_text_between_two_pages(browser_path: str, url: str,
                                 relay: Relay) -> tuple[str, str]:
    """Open `url` in two browser contexts (two people), wait for the data channel,
    type in each, see it in the other. Returns each page's route (candidate types).

    The relay is stopped between the two directions: the second text can only travel
    over the direct data channel."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path,
                                             args=CHROMIUM_ARGS, timeout=30_000)
        try:
            pages = [browser.new_context().new_page() for _ in range(2)]
            messages: list[str] = []
            for page in pages:
                page.set_default_timeout(TIMEOUT_MS)
                page.on("console", lambda message: messages.append(message.text))
                page.on("pageerror", lambda error: messages.append(str(error)))
            try:
                first, second = pages
                first.goto(url)
                expect(first.locator("#relay-status")).to_have_text(
                    re.compile("connected"), timeout=TIMEOUT_MS)
                second.goto(url)
                for page in pages:
                    expect(page.locator("#channels")).to_have_text("1", timeout=TIMEOUT_MS)
                    expect(page.locator("#text")).to_be_enabled()
                first.locator("#text").fill("typed in the first page \u00e9\U0001f600")
                expect(second.locator("#text")).to_have_value(
                    "typed in the first page \u00e9\U0001f600", timeout=TIMEOUT_MS)
                stats = relay.stats()
                assert stats["currentConnections"] == 2 and stats["messagesRelayed"] >= 2
                relay.kill()
                for page in pages:
                    expect(page.locator("#relay-status")).to_have_text(
                        re.compile("closed"), timeout=TIMEOUT_MS)
                second.locator("#text").fill("and an answer from the second")
                expect(first.locator("#text")).to_have_value(
                    "and an answer from the second", timeout=TIMEOUT_MS)
                routes = []
                for page in pages:
                    route = page.locator("#peers tr td:nth-child(4)")
                    expect(route).to_have_text(re.compile(r"\w+ / \w+"), timeout=TIMEOUT_MS)
                    routes.append(route.inner_text())
                for page in pages:
                    assert "signaling:" not in page.locator("#log").inner_text()
                return routes[0], routes[1]
            except Exception:
                for index, page in enumerate(pages):
                    print(f"page {index} log:\n{page.locator('#log').inner_text()}")
                print("console:", messages)
                raise
        finally:
            browser.close()


def test_two_demo_pages_share_text_over_a_webrtc_data_channel(tmp_path):
    browser_path = chromium()
    relay = Relay(tmp_path, "--demo")
    try:
        routes = share_text_between_two_pages(
            browser_path, f"http://127.0.0.1:{relay.port}/demo#browser-room", relay)
        assert all(route.startswith("host") for route in routes), routes
    finally:
        relay.kill()
    assert "browser-room" not in relay.output()  # room ids are never logged


def test_demo_pages_connect_through_coturn_with_the_relays_credentials(tmp_path):
    """TURN only (iceTransportPolicy "relay"): the data channel can only work through
    coturn, with the credentials /ice-servers handed out."""
    browser_path = chromium()
    turn = TurnServer(tmp_path).start()
    relay = Relay(tmp_path, "--demo", "--turn-secret", turn.secret, "--turn-uri",
                  turn.uri, "--stun-uri", turn.stun_uri)
    try:
        url = f"http://127.0.0.1:{relay.port}/demo?relay-only#turn-room"
        routes = share_text_between_two_pages(browser_path, url, relay)
        assert all(route.startswith("relay") for route in routes), routes
    finally:
        relay.kill()
        turn.stop()
    assert turn.secret not in relay.output()


def readme_example() -> str:
    """The "From a plain browser WebSocket" example of docs/signaling.rst, as written."""
    readme = (Path(__file__).resolve().parent.parent / "docs" / "signaling.rst").read_text()
    section = readme.split("From a plain browser ``WebSocket``", 1)[1].split("\nDemo page\n")[0]
    block = section.split("::\n\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines)


# Records every data channel the example makes or is given, so the test can use them.
RECORD_CHANNELS = """
window.channels = [];
const Original = window.RTCPeerConnection;
window.RTCPeerConnection = class extends Original {
  constructor(config) {
    super(config);
    this.addEventListener("datachannel", (event) => window.channels.push(event.channel));
  }
  createDataChannel(...args) {
    const channel = super.createDataChannel(...args);
    window.channels.push(channel);
    return channel;
  }
};
"""


def test_the_readme_browser_example_works(tmp_path):
    """The README's plain-WebSocket example, run as written in two pages of the relay's
    origin, connects them (and its `use` hears what the other page sends)."""
    browser_path = chromium()
    from playwright.sync_api import sync_playwright

    example = readme_example()
    assert 'const relay = "wss://relay.example.org";' in example
    relay = Relay(tmp_path, "--stun-uri", "stun:127.0.0.1:9")
    try:
        script = example.replace('"wss://relay.example.org"', f'"ws://127.0.0.1:{relay.port}"')
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=browser_path,
                                                 args=CHROMIUM_ARGS, timeout=30_000)
            try:
                pages = []
                for _ in range(2):
                    page = browser.new_context().new_page()
                    page.set_default_timeout(TIMEOUT_MS)
                    page.add_init_script(RECORD_CHANNELS)
                    page.goto(f"http://127.0.0.1:{relay.port}/stats")
                    page.evaluate(f"async () => {{ const roomId = 'readme-room';\n{script}\n}}")
                    pages.append(page)
                for page in pages:
                    page.wait_for_function(
                        "window.channels.some((c) => c.readyState === 'open')")
                # The example's use() logs "<id> says <data>" for what arrives.
                with pages[1].expect_console_message(
                        lambda message: message.text.endswith("says hello from the README")):
                    pages[0].evaluate("window.channels[0].send('hello from the README')")
            finally:
                browser.close()
    finally:
        relay.kill()
