"""Operations: Prometheus metrics and draining on stop."""

import json

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from iw_relay.config import RelayConfig
from iw_relay.metrics import metrics_root
from iw_relay.web import HealthResource
from tests.clients import client_factory, join


def samples(text):
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@pytest_twisted.ensureDeferred
async def test_metrics_are_scraped_and_parse(serve):
    config = RelayConfig(ping_interval=0, allowed_origins=("https://ok.example",))
    service, port = await serve(config)
    metrics_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Site(metrics_root(service.registry)))
    try:
        a = await join(reactor, port, "secret-room-1")
        b = await join(reactor, port, "secret-room-1")
        c = await join(reactor, port, "secret-room-2")
        a.send_json({"type": "op", "body": "private"})
        await b.wait_for(2)
        c.sendClose(1000)
        await c.closed
        b.sendMessage(b"\xff", isBinary=False)  # invalid UTF-8: closed with 1007
        await b.closed
        foreign = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            client_factory(f"ws://127.0.0.1:{port}/room/x", origin="https://evil.example"))
        foreign.opened.addErrback(lambda failure: None)  # refused: 403, as intended
        await foreign.closed
        response = await treq.get(
            f"http://127.0.0.1:{metrics_port.getHost().port}/metrics",
            pool=HTTPConnectionPool(reactor, persistent=False))
        text = await response.text()
    finally:
        await metrics_port.stopListening()
    values = samples(text)
    assert values[("iwrelay_rooms", ())] == 1
    assert values[("iwrelay_connections", ())] == 1
    assert values[("iwrelay_room_size_bucket", (("le", "1"),))] == 1
    assert values[("iwrelay_connections_opened_total", ())] == 3
    assert values[("iwrelay_connections_closed_total", (("code", "1000"),))] == 1
    assert values[("iwrelay_connections_closed_total", (("code", "1007"),))] == 1
    assert values[("iwrelay_handshakes_refused_total", (("reason", "origin"),))] == 1
    assert values[("iwrelay_messages_relayed_total", ())] == 1
    assert values[("iwrelay_received_bytes_total", ())] > 0
    assert values[("iwrelay_sent_bytes_total", ())] > 0
    assert values[("iwrelay_relay_seconds_count", ())] == 1
    assert ("iwrelay_slow_consumers_dropped_total", ()) in values
    assert ("iwrelay_rate_limited_messages_total", ()) in values
    assert "secret-room" not in text and "127.0.0.1" not in text and "private" not in text
    a.sendClose(1000)
    await a.closed


def render_health(registry):
    request = DummyRequest([b""])
    body = HealthResource(registry, lambda: 0.0).render(request)
    return request.responseCode or 200, json.loads(body)


def test_draining_health_and_the_drain_timeout(make_relay):
    relay = make_relay(RelayConfig(ping_interval=0, drain_timeout=5, shutdown_timeout=3))
    relay.service.startService()
    leaver, stayer = relay.join(), relay.join()
    code, health = render_health(relay.registry)
    assert (code, health["status"]) == (200, "healthy")
    stopped = relay.service.stopService()
    relay.flush()
    code, health = render_health(relay.registry)
    assert (code, health["status"]) == (503, "draining")
    for client in (leaver, stayer):
        assert client.received[-1]["type"] == "server-shutdown"
    assert stayer.close_code is None            # members may leave on their own...
    late = relay.connect("/room/abc")           # ...and nobody new may join
    assert late.close_code == 1006 and "[503]" in late.close_reason
    leaver.sendClose(1000)
    relay.advance(4.9)
    assert leaver.close_code == 1000 and stayer.close_code is None
    relay.advance(0.2)                          # drain time is up: 1001 for the rest
    assert (stayer.close_code, stayer.close_reason) == (1001, "Server shutting down")
    assert stopped.called
    assert relay.registry.refusals["shutting-down"] == 1


def test_duration_histogram_buckets_are_inclusive_and_cumulative():
    from iw_relay.metrics import DurationHistogram

    histogram = DurationHistogram((0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.005, 0.02):
        histogram.observe(seconds)
    family = histogram.family("x_seconds", "test")
    found = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert found[("x_seconds_bucket", "0.001")] == 2
    assert found[("x_seconds_bucket", "0.01")] == 3
    assert found[("x_seconds_bucket", "+Inf")] == 4
    assert found[("x_seconds_count", None)] == 4
    assert abs(found[("x_seconds_sum", None)] - 0.0265) < 1e-9
