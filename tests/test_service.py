"""The service tree: listening ports."""

import pytest
import pytest_twisted

from iw_relay.config import RelayConfig
from iw_relay.service import RelayService, with_backlog


@pytest.mark.parametrize(("given", "listened"), [
    ("tcp:3000", "tcp:3000:backlog=511"),
    ("tcp:3000:interface=127.0.0.1", "tcp:3000:interface=127.0.0.1:backlog=511"),
    ("ssl:443:privateKey=k.pem", "ssl:443:privateKey=k.pem:backlog=511"),
    ("tcp6:3000:backlog=64", "tcp6:3000:backlog=64"),   # the operator's own value wins
    ("haproxy:tcp:3000", "haproxy:tcp:3000:backlog=511"),
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),  # takes no backlog
])
def test_backlog_is_added_where_the_endpoint_takes_one(given, listened):
    assert with_backlog(given) == listened


@pytest_twisted.ensureDeferred
async def test_ports_listen_with_a_long_backlog():
    service = RelayService(RelayConfig(ports=("tcp:0:interface=127.0.0.1",), ping_interval=0))
    service.startService()
    try:
        (listener,) = service._listeners.values()
        port = await listener._waitingForPort
        assert port.backlog == 511
    finally:
        await service.stopService()
