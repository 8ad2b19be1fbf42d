"""twistd plugin shell: command line + environment -> RelayConfig -> RelayService.

Process-wide effects (the log observer handed to twistd's Application, Autobahn's log
level) happen here and nowhere else, so `RelayService` stays embeddable.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

from iw_relay import logs
from iw_relay._autobahn import lean_reactor_dispatch, tune_autobahn
from iw_relay.config import (
    FLAG_OPTIONS,
    LIST_OPTIONS,
    OPTION_PARSERS,
    OPTIONS,
    Option,
    RelayConfig,
    env_name,
    environment_settings,
    parse_flag,
)
from iw_relay.service import RelayService

if TYPE_CHECKING:
    from iw_relay.service import RelayReactor
from iw_relay.tlscheck import certificates_without_san

_log = Logger()
#: The exit status when a port cannot be opened (sysexits' EX_UNAVAILABLE).
EXIT_CANNOT_LISTEN = 69


def help_text(option: Option) -> str:
    """An option's --help line: its help and its default, both from the table."""
    return f"{option.help} [default: {option.default_text}]"


def _append_to(option: Option) -> Callable[[usage.Options, str], None]:
    """The opt_* method of a repeatable option: each use adds one value."""
    def opt(self: usage.Options, value: str) -> None:
        self[option.name].append(value)

    opt.__name__ = "opt_" + option.name.replace("-", "_")
    opt.__doc__ = help_text(option)
    return opt


class Options(usage.Options):
    """The `iwrelay` options, made from `iw_relay.config.OPTIONS`; each may also come from
    IWRELAY_<NAME> in the environment."""

    synopsis = "[options]"
    longdesc = (
        "Every option may also be set as IWRELAY_<NAME> (e.g. IWRELAY_RATE_LIMIT=200); "
        "the command line wins. Repeatable options take several values separated by "
        "spaces there. PORT, LOG_LEVEL and NODE_ENV=production are honoured as by the "
        "original relay. DURATION: seconds, or a number with ms, s, m, h, d. SIZE: bytes, "
        "or a number with KiB or MiB."
    )
    optParameters = [[o.name, None, None, help_text(o)] for o in OPTIONS if o.kind == "value"]
    optFlags = [[o.name, None, help_text(o)] for o in OPTIONS if o.kind == "flag"]
    # The repeatable options' opt_* methods are added below the class, from the table.

    def __init__(self, environ: Mapping[str, str] | None = None,
                 reactor: IReactorCore | None = None) -> None:
        super().__init__()
        for option in OPTIONS:
            if option.kind == "list":
                self[option.name] = []
        self._environ = os.environ if environ is None else environ
        self._reactor = reactor
        self._problem: str | None = None
        self.config: RelayConfig | None = None

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as problem:
            self._problem = str(problem)
            raise

    def getUsage(self, width: int | None = None) -> str:
        """After a bad value, nothing: twistd and twist print the usage with the error,
        and 90 lines of options would bury it. --help still prints them all."""
        if self._problem is not None:
            return ""
        return super().getUsage(width)

    def postOptions(self) -> None:
        try:
            from_env = environment_settings(self._environ)
        except ValueError as problem:
            raise usage.UsageError(str(problem)) from None
        # Each value is its field's type: the option table's parser made it.
        changes: dict[str, Any] = {}
        for option, (field, parse) in OPTION_PARSERS.items():
            if self[option] is not None:
                source, text = f"--{option}", self[option]
            elif option in from_env:
                source, text = from_env[option]
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
            if self[option]:
                source, values = f"--{option}", self[option]
            else:
                source, text = from_env.get(option, (env_name(option), ""))
                values = text.split()
            try:
                changes[field] = tuple(parse(value) for value in values)
            except ValueError as problem:
                raise usage.UsageError(f"{source}: {problem}") from None
        for option, field in FLAG_OPTIONS.items():
            if self[option]:
                changes[field] = True
            elif option in from_env:
                source, text = from_env[option]
                try:
                    changes[field] = parse_flag(text)
                except ValueError as problem:
                    raise usage.UsageError(f"{source}: {problem}") from None
        if self["port"]:
            source, ports = "--port", self["port"]
        elif "port" in from_env:
            source, text = from_env["port"]
            ports = text.split()
        else:
            source, ports = "--port", list(RelayConfig.ports)
        for port in ports:
            self._check_endpoint(port, source)
        if changes.get("metrics_port"):
            self._check_endpoint(changes["metrics_port"], "--metrics-port")
        try:
            self.config = RelayConfig(ports=tuple(ports), **changes)
        except ValueError as problem:
            raise usage.UsageError(str(problem)) from None
        if {"log_level", "log_format"} & changes.keys():
            self._log_under_twist(self.config)

    def _log_under_twist(self, config: RelayConfig) -> None:
        """Under `twist`, its runner logs, with its own --log-level and --log-format given
        before the plugin name: hand it the relay's level and observer instead, so that
        ``twist iwrelay --log-format json`` works as ``twistd -n iwrelay`` does."""
        parent = getattr(self, "parent", None)
        if parent is None or type(parent).__name__ != "TwistOptions":
            return
        parent["logLevel"] = logs.LEVELS[config.log_level]
        parent["fileLogObserverFactory"] = lambda out: logs.make_observer(config, out)
        parent["logFormat"] = config.log_format

    def _check_endpoint(self, description: str, option: str) -> None:
        """Parse the endpoint now (it reads TLS files), so a typo fails before listening."""
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor as installed

            reactor = installed
        try:
            serverFromString(reactor, description)
        except Exception as problem:
            raise usage.UsageError(f"{option} {description!r}: {problem}") from None


for _option in OPTIONS:
    if _option.kind == "list":
        setattr(Options, f"opt_{_option.name.replace('-', '_')}", _append_to(_option))


def config_from_environment(environ: Mapping[str, str] | None = None) -> RelayConfig:
    """The settings `twistd iwrelay` would run with and no options: every IWRELAY_*
    variable, and PORT, LOG_LEVEL and NODE_ENV as the original relay read them. For
    applications (.tac files) that adopt the relay. A bad value raises UsageError naming
    the variable."""
    options = Options(environ=environ)
    options.parseOptions([])
    assert options.config is not None
    return options.config


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

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        for child in self:
            self._start(child, child.privilegedStartService)

    def startService(self) -> None:
        Service.startService(self)
        for child in self:
            self._start(child, child.startService)
        from twisted.internet import reactor as installed

        reactor = cast("RelayReactor", installed)  # typed by Twisted as fewer interfaces
        reactor.callWhenRunning(self._stop_on_signals, reactor)

    def _start(self, child: IService, start: Callable[[], None]) -> None:
        """A port that cannot be opened (in use, a privileged port, an unknown address)
        ends the process with one line naming it and the reason, not a traceback."""
        try:
            start()
        except CannotListenError as problem:
            described = next((f"--port {d}" for d, listener in self._listeners.items()
                              if listener is child), f"--metrics-port {self.config.metrics_port}")
            reason = getattr(problem.socketError, "strerror", None) or problem.socketError
            stderr = sys.__stderr__ or sys.stderr  # twistd has redirected sys.stderr to its log
            stderr.write(f"iwrelay: cannot listen on {described}: {reason}\n")
            stderr.flush()
            raise SystemExit(EXIT_CANNOT_LISTEN) from None

    def _stop_on_signals(self, reactor: RelayReactor) -> None:
        def stop(signum: int, frame: object) -> None:
            reactor.callFromThread(self._stop_reactor, reactor, signal.Signals(signum).name)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, stop)

    def _stop_reactor(self, reactor: IReactorCore, name: str) -> None:
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
    from twisted.internet import reactor as installed

    reactor = cast(IReactorFromThreads, installed)  # typed by Twisted as fewer interfaces

    def reload() -> None:
        Deferred.fromCoroutine(service.reload_certificates())

    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))


def warn_of_certificates_without_san(config: RelayConfig) -> None:
    """Each certificate of an ssl: or tls: port without a subjectAltName, in the log."""
    for description in config.ports:
        for problem in certificates_without_san(description):
            _log.warn("{problem}", problem=problem)


def makeService(options: Options) -> IService:
    config = options.config
    assert config is not None, "parseOptions() makes the config"
    logs.quiet_autobahn()
    tune_autobahn()  # process-wide: only the plugin, not an application embedding the relay
    from twisted.internet import reactor  # twistd's, installed before makeService

    lean_reactor_dispatch(reactor)
    raise_open_files_limit()
    warn_of_certificates_without_san(config)
    service = TwistdRelayService(config)
    reload_on_sighup(service)
    return service
