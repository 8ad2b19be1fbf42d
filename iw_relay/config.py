"""RelayConfig: every setting, its default and its validation.

Durations ("500ms", "30s", "24h") and sizes ("64KiB", "1MiB") are parsed here so that the
command line, the environment and embedding code all share one set of rules.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class RelayConfig:
    """All of the relay's settings, already validated; durations in seconds."""

    ports: tuple[str, ...] = ("tcp:3000",)
    rate_limit: int = 100
    rate_window: float = 1.0
    #: Token-bucket capacity: frames a quiet connection may send at once; 0 = rate_limit.
    rate_burst: int = 0
    room_expiry: float = 24 * 3600.0
    cleanup_interval: float = 3600.0
    max_message_size: int = 1024 * 1024
    max_send_buffer: int = 1024 * 1024
    ping_interval: float = 30.0
    ping_timeout: float = 10.0
    handshake_timeout: float = 10.0
    shutdown_timeout: float = 10.0
    log_level: str = "info"
    log_format: str = "text"
    max_connections: int = 0
    max_connections_per_ip: int = 64
    max_room_size: int = 0
    flood_windows: int = 10
    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    auth_secret: bytes | None = field(default=None, repr=False)
    metrics_port: str | None = None
    drain_timeout: float = 0.0
    #: Cluster mode (iw_relay.cluster): None keeps the embedded in-process registry.
    redis: str | None = field(default=None, repr=False)
    node_heartbeat: float = 5.0
    redis_queue_size: int = 10000
    #: WebRTC (iw_relay.ice): the TURN REST API shared secret (coturn's
    #: static-auth-secret), TURN and STUN URIs served by /ice-servers, credential lifetime.
    turn_secret: bytes | None = field(default=None, repr=False)
    turn_uris: tuple[str, ...] = ()
    stun_uris: tuple[str, ...] = ()
    turn_ttl: float = 3600.0
    #: Serve the WebRTC demo page at /demo (iw_relay.demo).
    demo: bool = False

    def __post_init__(self) -> None:
        if not self.ports:
            raise ValueError("at least one --port is needed")
        for name in ("rate_window", "room_expiry", "cleanup_interval", "ping_timeout",
                     "handshake_timeout", "shutdown_timeout", "node_heartbeat"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be longer than zero")
        if self.ping_interval < 0:
            raise ValueError("ping_interval must not be negative")
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

    def replace(self, **changes: object) -> RelayConfig:
        return dataclasses.replace(self, **changes)


# option name -> (RelayConfig field, parser). The option name is also the environment
# variable's: IWRELAY_ + upper case, dashes as underscores.
OPTION_PARSERS = {
    "rate-limit": ("rate_limit", parse_positive_int),
    "rate-window": ("rate_window", _positive_duration),
    "rate-burst": ("rate_burst", parse_count),
    "room-expiry": ("room_expiry", _positive_duration),
    "cleanup-interval": ("cleanup_interval", _positive_duration),
    "max-message-size": ("max_message_size", _positive_size),
    "max-send-buffer": ("max_send_buffer", _positive_size),
    "ping-interval": ("ping_interval", parse_duration),
    "ping-timeout": ("ping_timeout", _positive_duration),
    "handshake-timeout": ("handshake_timeout", _positive_duration),
    "shutdown-timeout": ("shutdown_timeout", _positive_duration),
    "log-level": ("log_level", _choice(LOG_LEVELS)),
    "log-format": ("log_format", _choice(LOG_FORMATS)),
    "max-connections": ("max_connections", parse_count),
    "max-connections-per-ip": ("max_connections_per_ip", parse_count),
    "max-room-size": ("max_room_size", parse_count),
    "flood-windows": ("flood_windows", parse_count),
    "auth-secret": ("auth_secret", _secret),
    "auth-secret-file": ("auth_secret", read_secret_file),
    "metrics-port": ("metrics_port", str.strip),
    "drain-timeout": ("drain_timeout", parse_duration),
    "redis": ("redis", parse_redis_url),
    "node-heartbeat": ("node_heartbeat", _positive_duration),
    "redis-queue-size": ("redis_queue_size", parse_positive_int),
    "turn-secret": ("turn_secret", _secret),
    "turn-secret-file": ("turn_secret", read_secret_file),
    "turn-ttl": ("turn_ttl", _positive_duration),
}

# Repeatable options: option name -> (RelayConfig field, parser of one value). In the
# environment they hold several values separated by white space.
LIST_OPTIONS = {
    "allowed-origin": ("allowed_origins", parse_origin),
    "trusted-proxy": ("trusted_proxies", parse_cidr),
    "turn-uri": ("turn_uris", parse_turn_uri),
    "stun-uri": ("stun_uris", parse_stun_uri),
}

# Options without a value on the command line (``--demo``); in the environment,
# IWRELAY_DEMO=1 (or true, yes, on; 0, false, no, off).
FLAG_OPTIONS = {
    "demo": "demo",
}


def env_name(option: str) -> str:
    return "IWRELAY_" + option.upper().replace("-", "_")


def settings_from_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Option values (unparsed) that the environment gives, by option name.

    `IWRELAY_*` first; then the original relay's own variables where those are unset:
    `PORT` (a TCP port number), `LOG_LEVEL`, and `NODE_ENV=production` for JSON logs.
    """
    names = [*OPTION_PARSERS, *LIST_OPTIONS, *FLAG_OPTIONS]
    found = {opt: environ[env_name(opt)] for opt in names if env_name(opt) in environ}
    if env_name("port") in environ:
        found["port"] = environ[env_name("port")]
    elif environ.get("PORT"):
        found["port"] = "tcp:" + environ["PORT"].strip()
    if "log-level" not in found and environ.get("LOG_LEVEL"):
        found["log-level"] = environ["LOG_LEVEL"]
    if "log-format" not in found and environ.get("NODE_ENV") == "production":
        found["log-format"] = "json"
    return found
