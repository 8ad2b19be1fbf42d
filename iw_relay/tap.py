"""twistd plugin shell: command line + environment -> RelayConfig -> RelayService.

Process-wide effects (the log observer handed to twistd's Application, Autobahn's log
level) happen here and nowhere else, so `RelayService` stays embeddable.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
from collections.abc import Mapping

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

from iw_relay import logs
from iw_relay.config import (
    FLAG_OPTIONS,
    LIST_OPTIONS,
    OPTION_PARSERS,
    RelayConfig,
    env_name,
    parse_flag,
    settings_from_environment,
)
from iw_relay.service import RelayService

_log = Logger()

_HELP = {
    "rate-limit": "Messages per window per connection [default: 100].",
    "rate-window": "Rate-limit window, a DURATION such as 1s or 500ms [default: 1s].",
    "room-expiry": "Room lifetime from its creation [default: 24h].",
    "cleanup-interval": "How often expired rooms are swept [default: 1h].",
    "max-message-size": "Larger messages close the sender with 1009 [default: 1MiB].",
    "max-send-buffer": "Unread bytes queued for a client before it is closed with 1013 "
    "as a slow consumer [default: 1MiB].",
    "ping-interval": "Server WebSocket ping period; 0 disables [default: 30s].",
    "ping-timeout": "No pong by then: the peer is dropped [default: 10s].",
    "handshake-timeout": "Deadline from accept for the request head to be complete and an "
    "upgrade answered [default: 10s].",
    "shutdown-timeout": "Longest wait for clients to close on stop [default: 10s].",
    "log-level": "debug, info, warn or error [default: info].",
    "log-format": "text, or json: one JSON object per line [default: text].",
    "max-connections": "Open connections on the whole server, counted from accept; more "
    "are refused with HTTP 503 [default: 0, unlimited].",
    "max-connections-per-ip": "Open connections per client address, counted from accept; "
    "more are refused with HTTP 503 [default: 64; 0 unlimited].",
    "max-room-size": "Members per room; a join over it gets ROOM_FULL and close 1008 "
    "[default: 0, unlimited].",
    "flood-windows": "Consecutive rate windows over the limit before the sender is closed "
    "with 1008 [default: 10; 0 never].",
    "auth-secret": "HS256 secret: clients must pass ?token=JWT naming their room "
    "[default: off]. Prefer --auth-secret-file: a command line is visible to other users.",
    "auth-secret-file": "File holding the HS256 secret for ?token= [default: off].",
    "metrics-port": "Endpoint serving Prometheus /metrics, e.g. "
    "tcp:9100:interface=127.0.0.1 [default: off].",
    "drain-timeout": "On stop, time members get to leave on their own after "
    "server-shutdown before they are closed [default: 0s].",
    "redis": "Cluster mode: share rooms with other relay nodes through this Redis, "
    "e.g. redis://127.0.0.1:6379/0 [default: off, one node].",
    "node-heartbeat": "Cluster mode: how often this node tells Redis it is alive; one "
    "silent for three periods is dead and its members leave [default: 5s].",
    "redis-queue-size": "Cluster mode: commands awaiting Redis's reply before further "
    "messages for other nodes are dropped and counted [default: 10000].",
    "turn-secret": "TURN REST API shared secret (coturn's static-auth-secret): /ice-servers "
    "hands out time-limited TURN credentials [default: off]. Prefer --turn-secret-file.",
    "turn-secret-file": "File holding the TURN REST API shared secret [default: off].",
    "turn-ttl": "Lifetime of the TURN credentials /ice-servers hands out [default: 1h].",
    "demo": "Serve the WebRTC demo page at /demo [default: off].",
}


class Options(usage.Options):
    """The `iwrelay` options; each may also come from IWRELAY_<NAME> in the environment."""

    synopsis = "[options]"
    longdesc = (
        "Every option may also be set as IWRELAY_<NAME> (e.g. IWRELAY_RATE_LIMIT=200); "
        "the command line wins. PORT, LOG_LEVEL and NODE_ENV=production are honoured "
        "as by the original relay. DURATION: seconds, or a number with ms, s, m, h, d. "
        "SIZE: bytes, or a number with KiB or MiB."
    )
    optParameters = [[name, None, None, _HELP[name]] for name in OPTION_PARSERS]
    optFlags = [[name, None, _HELP[name]] for name in FLAG_OPTIONS]

    def __init__(self, environ: Mapping[str, str] | None = None, reactor: object = None):
        super().__init__()
        self["port"] = []
        for option in LIST_OPTIONS:
            self[option] = []
        self._environ = os.environ if environ is None else environ
        self._reactor = reactor
        self.config: RelayConfig | None = None

    def opt_allowed_origin(self, origin: str) -> None:
        """Browser origin allowed to connect (repeatable), e.g. https://editor.example.org; others get HTTP 403 [default: any]."""  # noqa: E501
        self["allowed-origin"].append(origin)

    def opt_trusted_proxy(self, cidr: str) -> None:
        """Proxy address or network (repeatable) whose X-Forwarded-For / X-Real-IP give the client address [default: loopback, 127.0.0.0/8 and ::1]."""  # noqa: E501
        self["trusted-proxy"].append(cidr)

    def opt_turn_uri(self, uri: str) -> None:
        """TURN URI handed out by /ice-servers with time-limited credentials (repeatable; needs --turn-secret), e.g. turn:turn.example.org:3478?transport=udp [default: none]."""  # noqa: E501
        self["turn-uri"].append(uri)

    def opt_stun_uri(self, uri: str) -> None:
        """STUN URI handed out by /ice-servers (repeatable), e.g. stun:stun.example.org:3478 [default: none]."""  # noqa: E501
        self["stun-uri"].append(uri)

    def opt_port(self, endpoint: str) -> None:
        """Endpoint to listen on (repeatable), e.g. tcp:3000:interface=127.0.0.1 or ssl:443:privateKey=key.pem:certKey=cert.pem [default: tcp:$PORT or tcp:3000]."""  # noqa: E501
        self["port"].append(endpoint)

    def postOptions(self) -> None:
        from_env = settings_from_environment(self._environ)
        changes: dict[str, object] = {}
        for option, (field, parse) in OPTION_PARSERS.items():
            if self[option] is not None:
                source, text = f"--{option}", self[option]
            elif option in from_env:
                source, text = env_name(option), from_env[option]
            else:
                continue
            if field in changes:
                both = " or ".join(f"--{o}" for o, (f, _) in OPTION_PARSERS.items()
                                   if f == field)
                raise usage.UsageError(f"give {both}, not both")
            try:
                changes[field] = parse(text)
            except ValueError as problem:
                raise usage.UsageError(f"{source}: {problem}") from None
        for option, (field, parse) in LIST_OPTIONS.items():
            source = f"--{option}" if self[option] else env_name(option)
            values = self[option] or from_env.get(option, "").split()
            try:
                changes[field] = tuple(parse(value) for value in values)
            except ValueError as problem:
                raise usage.UsageError(f"{source}: {problem}") from None
        for option, field in FLAG_OPTIONS.items():
            if self[option]:
                changes[field] = True
            elif option in from_env:
                try:
                    changes[field] = parse_flag(from_env[option])
                except ValueError as problem:
                    raise usage.UsageError(f"{env_name(option)}: {problem}") from None
        ports = self["port"] or from_env.get("port", "").split() or list(RelayConfig.ports)
        for port in ports:
            self._check_endpoint(port, "--port")
        if changes.get("metrics_port"):
            self._check_endpoint(changes["metrics_port"], "--metrics-port")
        try:
            self.config = RelayConfig(ports=tuple(ports), **changes)
        except ValueError as problem:
            raise usage.UsageError(str(problem)) from None

    def _check_endpoint(self, description: str, option: str) -> None:
        """Parse the endpoint now (it reads TLS files), so a typo fails before listening."""
        if self._reactor is None:
            from twisted.internet import reactor
        else:
            reactor = self._reactor
        try:
            serverFromString(reactor, description)
        except Exception as problem:
            raise usage.UsageError(f"{option} {description!r}: {problem}") from None


class TwistdRelayService(RelayService):
    """RelayService as the twistd plugin runs it.

    When twistd adopts it, it gives twistd's Application its log observer, so --log-level
    and --log-format govern every line twistd prints. Once the reactor runs, SIGTERM and
    SIGINT stop it gracefully and the process exits 0: Twisted's own handlers make it
    kill itself with the signal after a clean stop, which reads as a crash to anything
    but systemd.
    """

    def setServiceParent(self, parent: object) -> None:
        super().setServiceParent(parent)
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, logs.make_observer(self.config, sys.stdout))

    def startService(self) -> None:
        super().startService()
        from twisted.internet import reactor

        reactor.callWhenRunning(self._stop_on_signals, reactor)

    def _stop_on_signals(self, reactor: object) -> None:
        def stop(signum: int, frame: object) -> None:
            reactor.callFromThread(self._stop_reactor, reactor, signal.Signals(signum).name)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, stop)

    def _stop_reactor(self, reactor: object, name: str) -> None:
        _log.info("received {signal}: shutting down", signal=name)
        if reactor.running:
            reactor.stop()


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one: every client is a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            _log.warn("could not raise the open-files limit above {soft}", soft=soft)
            return soft
        _log.info("open-files limit raised from {soft} to {target}", soft=soft, target=target)
        return target
    _log.info("open-files limit is {soft}", soft=soft)
    return soft


def reload_on_sighup(service: RelayService) -> None:
    """SIGHUP re-reads the TLS certificate files (certbot's deploy hook sends it)."""
    from twisted.internet import reactor

    def reload() -> None:
        Deferred.fromCoroutine(service.reload_certificates())

    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))


def makeService(options: Options) -> IService:
    logs.quiet_autobahn()
    raise_open_files_limit()
    service = TwistdRelayService(options.config)
    reload_on_sighup(service)
    return service
