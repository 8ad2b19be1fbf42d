"""RelayConfig: every setting, its default and its validation.

`OPTIONS` is the one table of settings: each row gives the option's name (``--name`` and
``IWRELAY_NAME``), its `RelayConfig` field, its parser, its default and its help. The
twistd plugin's ``--help``, the dataclass's defaults and the documentation's
configuration page (``python -m iw_relay.options``) are all made from it, so they cannot
disagree. Durations ("500ms", "30s", "24h") and sizes ("64KiB", "1MiB") are parsed here so
that the command line, the environment and embedding code all share one set of rules.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NUMBER_WITH_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")

LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")


def parse_duration(text: str) -> float:
    """Seconds from "90", "1.5s", "500ms", "30m", "24h" or "7d"."""
    match = _NUMBER_WITH_UNIT.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or (unit not in _DURATION_UNITS and unit != ""):
        raise ValueError(f"{text!r} is not a duration (e.g. 500ms, 30s, 10m, 24h, 1d)")
    return float(match.group(1)) * _DURATION_UNITS.get(unit, 1.0)


def parse_size(text: str) -> int:
    """Bytes from "65536", "64KiB" or "1MiB"."""
    match = _NUMBER_WITH_UNIT.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 65536, 64KiB, 1MiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _whole_number(text: str, minimum: int, meaning: str = "") -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise ValueError(f"{text!r} must be at least {minimum}{meaning}")
    return value


def parse_positive_int(text: str) -> int:
    return _whole_number(text, 1)


def parse_count(text: str) -> int:
    """A whole number, 0 meaning unlimited."""
    return _whole_number(text, 0, " (0 means unlimited)")


def parse_cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise ValueError(f"{text!r} is not an address or network (e.g. 10.0.0.0/8)") from None


def read_secret_file(path: str) -> bytes:
    try:
        with open(path, "rb") as secret_file:
            secret = secret_file.read().strip()
    except OSError as problem:
        raise ValueError(f"cannot read {path!r}: {problem.strerror}") from None
    if not secret:
        raise ValueError(f"{path!r} is empty")
    return secret


def _secret(text: str) -> bytes:
    if not text:
        raise ValueError("the secret is empty")
    return text.encode()


def parse_origin(origin: str) -> str:
    """'https://Example.org:443/' -> 'https://example.org'; 'null' stays 'null'."""
    origin = origin.strip()
    if origin == "null":
        return origin
    parts = urlsplit(origin)
    if not parts.scheme or not parts.hostname:
        raise ValueError(f"{origin!r} is not an origin such as https://editor.example.org")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    suffix = "" if port is None or port == _DEFAULT_PORTS.get(parts.scheme.lower()) else f":{port}"
    return f"{parts.scheme.lower()}://{host}{suffix}"


def parse_redis_url(text: str) -> str:
    """A redis://[[user]:password@]host[:port][/db] URL, checked and returned as given."""
    text = str(text).strip()
    parts = urlsplit(text)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"{text!r} is not a Redis URL such as redis://127.0.0.1:6379/0")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"{text!r} has a bad port") from None
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"{text!r}: the database must be a number (redis://host:6379/0)")
    return text


def _ice_uri(schemes: tuple[str, ...]):
    """A STUN or TURN URI (RFC 7064 / 7065) such as turn:turn.example.org:3478?transport=udp,
    checked for its scheme and host only: browsers read the rest."""
    def parse(text: str) -> str:
        uri = str(text).strip()
        scheme, _, rest = uri.partition(":")
        if scheme.lower() not in schemes or not rest or rest.startswith(("/", "?", ":")):
            raise ValueError(f"{text!r} is not a {' or '.join(s + ':' for s in schemes)} "
                             f"URI such as {schemes[0]}:host.example.org:3478")
        return uri

    return parse


parse_turn_uri = _ice_uri(("turn", "turns"))
parse_stun_uri = _ice_uri(("stun", "stuns"))

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def parse_flag(text: str) -> bool:
    value = str(text).strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(f"{text!r} is not one of 1, 0, true, false, yes, no, on, off")
    return value in _TRUE


def _choice(allowed: tuple[str, ...]):
    def parse(text: str) -> str:
        value = str(text).strip().lower()
        if value == "warning":
            value = "warn"
        if value not in allowed:
            raise ValueError(f"{text!r} is not one of {', '.join(allowed)}")
        return value

    return parse


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return value


def _positive_size(text: str) -> int:
    value = parse_size(text)
    if value < 1:
        raise ValueError(f"{text!r} must be at least one byte")
    return value


def _endpoint(text: str) -> str:
    """A Twisted endpoint string; tap.py parses it against the reactor before listening."""
    endpoint = str(text).strip()
    if not endpoint:
        raise ValueError("an endpoint is empty (e.g. tcp:3000)")
    return endpoint


@dataclass(frozen=True)
class Option:
    """One row of the option table.

    `default` is written as a user would type it (``"24h"``, ``"1MiB"``) and parsed by
    `parse` into the `RelayConfig` default, so it is shown and applied from one place;
    None means the setting is off. `kind` is ``value``, ``list`` (repeatable; several
    values separated by white space in the environment) or ``flag`` (no value on the
    command line; 1/0, true/false, yes/no, on/off in the environment).
    """

    name: str
    field: str
    parse: Callable[[str], Any]
    default: str | None
    help: str
    metavar: str = ""
    kind: str = "value"
    #: How the default reads when the typed form alone would not say it.
    shown_default: str | None = None

    @property
    def env(self) -> str:
        return env_name(self.name)

    @property
    def default_text(self) -> str:
        if self.shown_default is not None:
            return self.shown_default
        if self.default is None:
            return "none" if self.kind == "list" else "off"
        return self.default

    def default_value(self) -> Any:
        if self.kind == "flag":
            return False
        if self.kind == "list":
            return tuple(self.parse(value) for value in (self.default or "").split())
        return None if self.default is None else self.parse(self.default)


_CLUSTER = "Cluster mode: "

#: Every option, in the order --help and the documentation list them. To add a setting:
#: one row here and one `RelayConfig` field whose default is ``_default("name")``.
OPTIONS: tuple[Option, ...] = (
    Option("port", "ports", _endpoint, "tcp:3000",
           "Endpoint to listen on, a Twisted endpoint string such as "
           "tcp:3000:interface=127.0.0.1, tcp6:3000, "
           "ssl:443:privateKey=key.pem:certKey=cert.pem:extraCertChain=chain.pem or "
           "tls:/etc/iwrelay/certs:port=443. Repeatable: every port serves the same rooms.",
           "ENDPOINT", "list", shown_default="tcp:$PORT if PORT is set, else tcp:3000"),
    Option("rate-limit", "rate_limit", parse_positive_int, "100",
           "Frames (messages, pings, pongs, continuation frames) per rate window per "
           "connection; frames over it are dropped, with one RATE_LIMIT_EXCEEDED a "
           "window.", "N"),
    Option("rate-window", "rate_window", _positive_duration, "1s",
           "Length of the rate-limit window: the allowance is refilled once per window.",
           "DURATION"),
    Option("rate-burst", "rate_burst", parse_count, "0",
           "Frames a quiet connection may send at once: unused allowance is saved up to "
           "this many, so an editor can flush what it queued offline; 0 is the same as "
           "--rate-limit (the original's fixed window).", "N"),
    Option("flood-windows", "flood_windows", parse_count, "10",
           "Rate windows over the limit, less those within it, before the sender is "
           "closed with 1008; 0 never closes.", "N"),
    Option("room-expiry", "room_expiry", _positive_duration, "24h",
           "Room lifetime, counted from its creation.", "DURATION"),
    Option("cleanup-interval", "cleanup_interval", _positive_duration, "1h",
           "How often expired rooms are swept.", "DURATION"),
    Option("max-message-size", "max_message_size", _positive_size, "1MiB",
           "Largest message or frame; a larger one closes the sender with 1009.", "SIZE"),
    Option("max-send-buffer", "max_send_buffer", _positive_size, "1MiB",
           "Unread bytes queued for one client before it is closed with 1013 as a slow "
           "consumer.", "SIZE"),
    Option("ping-interval", "ping_interval", parse_duration, "30s",
           "Period of the server's WebSocket pings; 0 disables them.", "DURATION"),
    Option("ping-timeout", "ping_timeout", _positive_duration, "10s",
           "A peer that has not answered a ping by then is dropped.", "DURATION"),
    Option("handshake-timeout", "handshake_timeout", _positive_duration, "10s",
           "Deadline, from accept, for a connection's request head to be complete and "
           "its upgrade answered.",
           "DURATION"),
    Option("shutdown-timeout", "shutdown_timeout", _positive_duration, "10s",
           "On stop, longest wait for the clients to close.", "DURATION"),
    Option("drain-timeout", "drain_timeout", parse_duration, "0s",
           "On stop, time members get to leave on their own after server-shutdown "
           "before they are closed; /health answers 503 meanwhile.", "DURATION"),
    Option("log-level", "log_level", _choice(LOG_LEVELS), "info",
           "debug, info, warn or error.", "LEVEL"),
    Option("log-format", "log_format", _choice(LOG_FORMATS), "text",
           "text, or json: one JSON object per line.", "FORMAT"),
    Option("max-connections", "max_connections", parse_count, "0",
           "Open connections on the whole server, counted from accept; more are refused "
           "with HTTP 503. "
           "0 is unlimited.", "N"),
    Option("max-connections-per-ip", "max_connections_per_ip", parse_count, "64",
           "Open connections per client address, counted from accept; more are refused "
           "with HTTP 503. "
           "0 is unlimited.", "N"),
    Option("max-room-size", "max_room_size", parse_count, "0",
           "Members per room; a join over it gets ROOM_FULL and close 1008. "
           "0 is unlimited.", "N"),
    Option("allowed-origin", "allowed_origins", parse_origin, None,
           "Browser origin allowed to connect, e.g. https://editor.example.org; "
           "a handshake from another origin gets HTTP 403. Repeatable.", "ORIGIN", "list",
           shown_default="none: any origin"),
    Option("trusted-proxy", "trusted_proxies", parse_cidr, None,
           "Proxy address or network whose X-Forwarded-For and X-Real-IP give the "
           "client's address. Repeatable; given, only these are trusted.", "CIDR", "list",
           shown_default="loopback, 127.0.0.0/8 and ::1"),
    Option("auth-secret", "auth_secret", _secret, None,
           "HS256 secret: clients must pass ?token=JWT naming their room. Prefer "
           "--auth-secret-file: a command line is visible to other users.", "SECRET"),
    Option("auth-secret-file", "auth_secret", read_secret_file, None,
           "File holding the HS256 secret for ?token=.", "PATH"),
    Option("metrics-port", "metrics_port", _endpoint, None,
           "Endpoint serving Prometheus /metrics, e.g. tcp:9100:interface=127.0.0.1.",
           "ENDPOINT"),
    Option("redis", "redis", parse_redis_url, None,
           _CLUSTER + "share rooms with other relay nodes through this Redis, e.g. "
           "redis://127.0.0.1:6379/0. Off: one node.", "URL"),
    Option("node-heartbeat", "node_heartbeat", _positive_duration, "5s",
           _CLUSTER + "how often this node tells Redis it is alive; a node silent for "
           "three periods is dead and its members leave.", "DURATION"),
    Option("redis-queue-size", "redis_queue_size", parse_positive_int, "10000",
           _CLUSTER + "commands awaiting Redis's reply, and messages for other nodes "
           "that Redis has not yet confirmed taking (a PUBLISH has no reply: one PING "
           "50 ms after the first unconfirmed one confirms them all), before further "
           "messages for other nodes are dropped and counted.", "N"),
    Option("turn-secret", "turn_secret", _secret, None,
           "TURN REST API shared secret (coturn's static-auth-secret): /ice-servers hands "
           "out time-limited TURN credentials. Prefer --turn-secret-file.", "SECRET"),
    Option("turn-secret-file", "turn_secret", read_secret_file, None,
           "File holding the TURN REST API shared secret.", "PATH"),
    Option("turn-uri", "turn_uris", parse_turn_uri, None,
           "TURN URI handed out by /ice-servers with time-limited credentials, e.g. "
           "turn:turn.example.org:3478?transport=udp; needs --turn-secret. Repeatable.",
           "URI", "list"),
    Option("stun-uri", "stun_uris", parse_stun_uri, None,
           "STUN URI handed out by /ice-servers, e.g. stun:stun.example.org:3478. "
           "Repeatable.", "URI", "list"),
    Option("turn-ttl", "turn_ttl", _positive_duration, "1h",
           "Lifetime of the TURN credentials /ice-servers hands out.", "DURATION"),
    Option("demo", "demo", parse_flag, None,
           "Serve the WebRTC demo page at /demo.", kind="flag"),
    Option("recovery-window", "recovery_window", parse_duration, "0s",
           "Connection recovery: how long a dropped member may resume (?resume=) with "
           "nothing missed and no user-left for its peers; 0s is off.", "DURATION"),
    Option("recovery-max-messages", "recovery_max_messages", parse_positive_int, "1000",
           "Connection recovery: messages kept per room.", "N"),
    Option("recovery-max-bytes", "recovery_max_bytes", _positive_size, "1MiB",
           "Connection recovery: bytes of messages kept per room.", "SIZE"),
)

_BY_NAME = {option.name: option for option in OPTIONS}


def _default(name: str) -> Any:
    return _BY_NAME[name].default_value()


@dataclass(frozen=True)
class RelayConfig:
    """All of the relay's settings, already validated; durations in seconds, sizes in
    bytes. Each default is its option's, from `OPTIONS`."""

    ports: tuple[str, ...] = _default("port")
    rate_limit: int = _default("rate-limit")
    rate_window: float = _default("rate-window")
    #: Token-bucket capacity: frames a quiet connection may send at once; 0 = rate_limit.
    rate_burst: int = _default("rate-burst")
    room_expiry: float = _default("room-expiry")
    cleanup_interval: float = _default("cleanup-interval")
    max_message_size: int = _default("max-message-size")
    max_send_buffer: int = _default("max-send-buffer")
    ping_interval: float = _default("ping-interval")
    ping_timeout: float = _default("ping-timeout")
    handshake_timeout: float = _default("handshake-timeout")
    shutdown_timeout: float = _default("shutdown-timeout")
    log_level: str = _default("log-level")
    log_format: str = _default("log-format")
    max_connections: int = _default("max-connections")
    max_connections_per_ip: int = _default("max-connections-per-ip")
    max_room_size: int = _default("max-room-size")
    flood_windows: int = _default("flood-windows")
    allowed_origins: tuple[str, ...] = _default("allowed-origin")
    trusted_proxies: tuple[str, ...] = _default("trusted-proxy")
    auth_secret: bytes | None = field(default=_default("auth-secret"), repr=False)
    metrics_port: str | None = _default("metrics-port")
    drain_timeout: float = _default("drain-timeout")
    #: Cluster mode (iw_relay.backplane.redis): None keeps rooms in this process only.
    redis: str | None = field(default=_default("redis"), repr=False)
    node_heartbeat: float = _default("node-heartbeat")
    redis_queue_size: int = _default("redis-queue-size")
    #: WebRTC (iw_relay.ice): the TURN REST API shared secret (coturn's
    #: static-auth-secret), TURN and STUN URIs served by /ice-servers, credential lifetime.
    turn_secret: bytes | None = field(default=_default("turn-secret"), repr=False)
    turn_uris: tuple[str, ...] = _default("turn-uri")
    stun_uris: tuple[str, ...] = _default("stun-uri")
    turn_ttl: float = _default("turn-ttl")
    #: Serve the WebRTC demo page at /demo (iw_relay.demo).
    demo: bool = _default("demo")
    #: Connection recovery (iw_relay.recovery): how long a dropped member may resume;
    #: 0 is off (today's wire protocol exactly). Per-room history bounds.
    recovery_window: float = _default("recovery-window")
    recovery_max_messages: int = _default("recovery-max-messages")
    recovery_max_bytes: int = _default("recovery-max-bytes")

    def __post_init__(self) -> None:
        if not self.ports:
            raise ValueError("at least one --port is needed")
        for name in ("rate_window", "room_expiry", "cleanup_interval", "ping_timeout",
                     "handshake_timeout", "shutdown_timeout", "node_heartbeat"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be longer than zero")
        if self.ping_interval < 0:
            raise ValueError("ping_interval must not be negative")
        if self.recovery_window < 0:
            raise ValueError("recovery_window must not be negative")
        if min(self.recovery_max_messages, self.recovery_max_bytes) < 1:
            raise ValueError("recovery_max_messages and recovery_max_bytes must be >= 1")
        if min(self.rate_limit, self.max_message_size, self.max_send_buffer,
               self.redis_queue_size) < 1:
            raise ValueError("rate_limit, max_message_size, max_send_buffer and "
                             "redis_queue_size must be >= 1")
        if self.rate_burst and self.rate_burst < self.rate_limit:
            raise ValueError("rate_burst must be 0 (= rate_limit) or at least rate_limit")
        if self.turn_ttl <= 0:
            raise ValueError("turn_ttl must be longer than zero")
        if bool(self.turn_uris) != (self.turn_secret is not None):
            raise ValueError("--turn-uri and --turn-secret (or --turn-secret-file) go "
                             "together: TURN credentials need both")
        if self.log_level not in LOG_LEVELS or self.log_format not in LOG_FORMATS:
            raise ValueError("unknown log level or format")



# Lookups by option name, made from OPTIONS for the code that reads settings.
#: Options with one value: name -> (RelayConfig field, parser).
OPTION_PARSERS = {o.name: (o.field, o.parse) for o in OPTIONS if o.kind == "value"}
#: Repeatable options but --port (whose endpoints tap.py checks against the reactor):
#: name -> (RelayConfig field, parser of one value).
LIST_OPTIONS = {o.name: (o.field, o.parse) for o in OPTIONS
                if o.kind == "list" and o.name != "port"}
#: Options without a value on the command line: name -> RelayConfig field.
FLAG_OPTIONS = {o.name: o.field for o in OPTIONS if o.kind == "flag"}


def env_name(option: str) -> str:
    """The environment variable of an option: IWRELAY_ + upper case, dashes as
    underscores."""
    return "IWRELAY_" + option.upper().replace("-", "_")


def environment_settings(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Option values (unparsed) that the environment gives: option name -> (the variable
    that gave it, its text), so that an error names the variable the user set.

    `IWRELAY_*` first; then the original relay's own variables where those are unset:
    `PORT` (a TCP port number), `LOG_LEVEL`, and `NODE_ENV=production` for JSON logs.
    """
    found = {o.name: (o.env, environ[o.env]) for o in OPTIONS if o.env in environ}
    if "port" not in found and environ.get("PORT"):
        number = environ["PORT"].strip()
        if not number.isdigit() or not 0 <= int(number) <= 65535:
            raise ValueError(f"PORT: {environ['PORT']!r} is not a TCP port number")
        found["port"] = ("PORT", "tcp:" + number)
    if "log-level" not in found and environ.get("LOG_LEVEL"):
        found["log-level"] = ("LOG_LEVEL", environ["LOG_LEVEL"])
    if "log-format" not in found and environ.get("NODE_ENV") == "production":
        found["log-format"] = ("NODE_ENV", "json")
    return found
