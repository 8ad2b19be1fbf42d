"""A headless Chromium for the browser tests, and a `twistd iwrelay` for it to talk to.

Needs Debian's chromium and the `playwright` Python package (never `playwright install`:
the system's browser is driven). Without them the tests are skipped, unless
IWRELAY_REQUIRE_BROWSER is set (CI sets it), in which case they fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.page_server import PageServer
from tests.relay_process import LISTENING, TWISTD, relay_environment

CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    # Two pages on one machine: plain host candidates, loopback included, no mDNS names.
    "--disable-features=WebRtcHideLocalIpsWithMdns", "--allow-loopback-in-peer-connection",
]
TIMEOUT_MS = 20_000


def chromium() -> str:
    """The chromium binary, or skip (or fail, under IWRELAY_REQUIRE_BROWSER) without it
    or without the playwright package."""
    found = shutil.which("chromium") or ("/usr/bin/chromium"
                                         if os.path.exists("/usr/bin/chromium") else None)
    if importlib.util.find_spec("playwright") is None:
        found = None
    if found is None:
        if os.environ.get("IWRELAY_REQUIRE_BROWSER"):
            pytest.fail("IWRELAY_REQUIRE_BROWSER is set but chromium or the playwright "
                        "package is missing")
        pytest.skip("no chromium or no playwright package (apt-get install chromium; "
                    "pip install playwright); set IWRELAY_REQUIRE_BROWSER=1 to make this "
                    "a failure")
    return found


@contextmanager
def launched_chromium() -> Iterator[Any]:
    """A headless Chromium (playwright's sync API), closed on the way out."""
    browser_path = chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path,
                                             args=CHROMIUM_ARGS, timeout=30_000)
        try:
            yield browser
        finally:
            browser.close()


class Relay:
    """`twistd -n iwrelay --demo ...` on a free loopback port, killed at the end."""

    def __init__(self, workdir: Path, *options: str) -> None:
        self.stdout_path = workdir / "relay.stdout"
        with open(self.stdout_path, "wb") as out:
            self.process = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "iwrelay", "--port",
                 "tcp:0:interface=127.0.0.1", "--ping-interval", "0", *options],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=relay_environment(), cwd=workdir,
            )
        deadline = time.monotonic() + 15
        while not (found := LISTENING.findall(self.output())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the relay did not start:\n{self.output()}")
            time.sleep(0.05)  # polling the log, bounded by the deadline
        self.port = int(found[0][1])

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as r:
            return json.load(r)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def open_page(browser, pages: PageServer):
    """A new page (its own context) on the page server, once IWRelaySocket is defined;
    `page.errors` collects its uncaught errors."""
    page = browser.new_context().new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(pages.url)
    page.wait_for_function("typeof IWRelaySocket === 'function'")
    page.errors = errors
    return page
