"""The demo page's Content-Security-Policy: its own origin only. (tests/test_browser.py
shows that the page works under it in Chromium.)"""

import pytest_twisted
from treq.testing import StubTreq

from iw_relay.demo import DemoResource


@pytest_twisted.ensureDeferred
async def test_demo_page_may_connect_to_its_own_origin_only():
    response = await StubTreq(DemoResource()).get("http://relay.example.org/demo")
    assert response.code == 200
    (policy,) = response.headers.getRawHeaders("content-security-policy")
    directives = {part.split()[0]: part.split()[1:] for part in policy.split(";")
                  if part.strip()}
    assert directives["connect-src"] == ["'self'"]
    assert directives["default-src"] == ["'none'"]
    assert directives["frame-ancestors"] == ["'none'"]
