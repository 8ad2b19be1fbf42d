"""A renewed certificate is picked up without dropping anyone: ssl: and tls: ports."""

import socket

import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor
from twisted.internet.endpoints import TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS

from iw_relay.config import RelayConfig
from iw_relay.service import RelayService
from tests.clients import client_factory, join
from tests.helpers import free_port


def trusting(ca):
    return optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(ca.cert_pem.bytes()))


def issue(ca, key_path, cert_path):
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    cert.private_key_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    return cert


@pytest.fixture
def relay_on():
    running = []

    def start(description):
        service = RelayService(RelayConfig(ports=(description,), ping_interval=0))
        service.startService()
        running.append(service)
        return service

    yield start
    for service in running:
        pytest_twisted.blockon(service.stopService())


@pytest_twisted.ensureDeferred
async def test_ssl_port_reloads_its_certificate(tmp_path, relay_on):
    old_ca, new_ca = trustme.CA(), trustme.CA()
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    issue(old_ca, key, cert)
    port = free_port()
    service = relay_on(f"ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1")
    before = await join(reactor, port, "r", tls_options=trusting(old_ca))

    issue(new_ca, key, cert)  # the renewal: same files, new certificate
    await service.reload_certificates()

    after = await join(reactor, port, "r", tls_options=trusting(new_ca))
    with pytest.raises(ConnectionError):  # the old certificate is no longer served
        await join(reactor, port, "r", tls_options=trusting(old_ca))
    before.send_json({"type": "op", "from": "before"})
    (*_, relayed) = await after.wait_for(2)
    assert relayed["from"] == "before"   # the old connection lived through the reload
    for client in (before, after):
        client.sendClose(1000)
        await client.closed


@pytest_twisted.ensureDeferred
async def test_a_broken_renewal_keeps_the_old_certificate(tmp_path, relay_on,
                                                           logged_failures):
    ca = trustme.CA()
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    issue(ca, key, cert)
    port = free_port()
    service = relay_on(f"ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1")
    cert.write_text("half-written file")
    await service.reload_certificates()
    (failure,) = logged_failures.take()
    assert "certificate reload failed" in failure["log_format"]
    client = await join(reactor, port, "r", tls_options=trusting(ca))
    client.sendClose(1000)
    await client.closed


@pytest_twisted.ensureDeferred
async def test_tls_directory_port_reloads(tmp_path, relay_on):
    old_ca, new_ca = trustme.CA(), trustme.CA()
    directory = tmp_path / "certs"
    directory.mkdir()

    def install(ca):
        issued = ca.issue_cert("localhost", "::1")
        with open(directory / "localhost.pem", "wb") as pem:
            pem.write(issued.private_key_pem.bytes())
            for blob in issued.cert_chain_pems:
                pem.write(blob.bytes())

    install(old_ca)
    port = free_port(socket.AF_INET6, "::1")
    service = relay_on(f"tls:{directory}:port={port}:interface=\\:\\:1")

    async def join6(ca):
        endpoint = wrapClientTLS(trusting(ca), TCP6ClientEndpoint(reactor, "::1", port))
        client = await endpoint.connect(client_factory(f"wss://localhost:{port}/room/r"))
        await client.opened
        await client.wait_for(1)
        return client

    before = await join6(old_ca)
    install(new_ca)
    await service.reload_certificates()
    after = await join6(new_ca)
    before.send_json({"type": "op"})
    (*_, relayed) = await after.wait_for(2)
    assert relayed["type"] == "op"
    for client in (before, after):
        client.sendClose(1000)
        await client.closed
