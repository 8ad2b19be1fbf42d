"""/client.js (iw_relay.clientjs) over twisted.web, and the cutting proxy the browser
tests use, on real loopback sockets."""

from __future__ import annotations

import socket
import subprocess

import pytest
import pytest_twisted
from treq.testing import StubTreq

from iw_relay.clientjs import ClientScriptResource, script
from tests.cutting_proxy import CuttingProxy


@pytest_twisted.ensureDeferred
async def test_client_js_headers_and_body():
    resource = ClientScriptResource()
    client = StubTreq(resource)
    response = await client.get("http://relay.example/client.js")
    assert response.code == 200
    headers = response.headers
    assert headers.getRawHeaders("content-type") == ["text/javascript; charset=utf-8"]
    assert headers.getRawHeaders("x-content-type-options") == ["nosniff"]
    assert headers.getRawHeaders("cache-control") == ["public, max-age=600"]
    etag = headers.getRawHeaders("etag")[0]
    assert etag == resource.etag.decode()
    body = await response.content()
    assert body == script() and b"class IWRelaySocket" in body


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("condition, code", [
    ("{etag}", 304), ("W/{etag}", 304), ('"nope", {etag}', 304), ("*", 304),
    ('"nope"', 200), ("", 200),
])
async def test_client_js_revalidates_with_its_etag(condition, code):
    resource = ClientScriptResource()
    client = StubTreq(resource)
    header = condition.format(etag=resource.etag.decode())
    response = await client.get("http://relay.example/client.js",
                                headers={"If-None-Match": header})
    assert response.code == code
    body = await response.content()
    assert (body == b"") is (code == 304)


def test_the_etag_follows_the_content():
    assert ClientScriptResource(b"a").etag != ClientScriptResource(b"b").etag
    assert ClientScriptResource(b"a").etag == ClientScriptResource(b"a").etag


def test_client_js_is_plain_es2020_that_node_can_parse(tmp_path):
    """No build step: the served file is the source, valid JavaScript as it is."""
    node = subprocess.run(["node", "--version"], capture_output=True, text=True)
    if node.returncode != 0:
        pytest.skip("node is not installed")
    path = tmp_path / "client.js"
    path.write_bytes(script())
    checked = subprocess.run(["node", "--check", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


# -- the cutting proxy --------------------------------------------------------------------


@pytest.fixture
def upstream():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    yield server
    server.close()


def through(proxy: CuttingProxy) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    return client


def test_proxy_forwards_both_ways(upstream):
    with CuttingProxy(upstream.getsockname()[1]) as proxy:
        client = through(proxy)
        accepted, _ = upstream.accept()
        accepted.settimeout(5)
        client.sendall(b"ping")
        assert accepted.recv(10) == b"ping"
        accepted.sendall(b"pong")
        assert client.recv(10) == b"pong"
        assert proxy.live_connections() == 1
        accepted.close()
        assert client.recv(10) == b""  # a close upstream closes the client side
        client.close()


def test_proxy_cuts_live_connections_and_refuses_for_a_while(upstream):
    now = [1000.0]
    with CuttingProxy(upstream.getsockname()[1], now=lambda: now[0]) as proxy:
        client = through(proxy)
        accepted, _ = upstream.accept()
        accepted.settimeout(5)
        proxy.cut(refuse_for=3)
        with pytest.raises(ConnectionResetError):
            client.recv(10)  # a reset, as a network change gives
        with pytest.raises(ConnectionResetError):
            accepted.recv(10)
        assert proxy.refusing()
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            through(proxy).recv(10)
        assert proxy.refused == 1 and proxy.cut_count == 1
        now[0] += 3  # the refusal is over
        assert not proxy.refusing()
        client = through(proxy)
        accepted, _ = upstream.accept()
        client.sendall(b"again")
        accepted.settimeout(5)
        assert accepted.recv(10) == b"again"
        for sock in (client, accepted):
            sock.close()


def test_a_refusal_is_bounded():
    from tests import cutting_proxy

    now = [0.0]
    with CuttingProxy(9, now=lambda: now[0]) as proxy:
        proxy.cut(refuse_for=10_000)
        now[0] = cutting_proxy.MAX_REFUSAL
        assert not proxy.refusing()
