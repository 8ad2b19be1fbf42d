import dataclasses

import pytest
from twisted.internet.task import Clock
from twisted.python import usage

from iw_relay.config import OPTIONS, RelayConfig, env_name, parse_duration, parse_size
from iw_relay.tap import Options, help_text, makeService


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90.0), ("1.5s", 1.5), ("500ms", 0.5), ("30m", 1800.0), ("24h", 86400.0),
    ("1d", 86400.0), ("0", 0.0), (" 2s ", 2.0),
])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "5x", "-1s", "1.2.3s", "1 hour", "nan"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(("text", "size"), [
    ("65536", 65536), ("64KiB", 65536), ("1MiB", 1048576), ("1mib", 1048576), ("2b", 2),
])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "1MB", "KiB", "-5", "1.5.5KiB"])
def test_bad_sizes(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def parse(args, environ=None):
    options = Options(environ=environ or {}, reactor=Clock())
    options.parseOptions(args)
    return options.config


def test_defaults_are_the_specs():
    assert parse([]) == RelayConfig()
    config = RelayConfig()
    assert config.ports == ("tcp:3000",)
    assert (config.rate_limit, config.rate_window) == (100, 1.0)
    assert (config.room_expiry, config.cleanup_interval) == (86400.0, 3600.0)
    assert config.max_message_size == 1024 * 1024
    assert (config.ping_interval, config.ping_timeout, config.shutdown_timeout) == (30, 10, 10)
    assert (config.log_level, config.log_format) == ("info", "text")


def test_every_option_from_the_command_line():
    config = parse([
        "--port", "tcp:4000:interface=127.0.0.1", "--port", "tcp6:4001",
        "--rate-limit", "7", "--rate-window", "500ms", "--room-expiry", "2h",
        "--cleanup-interval", "5m", "--max-message-size", "64KiB", "--ping-interval", "0",
        "--ping-timeout", "3s", "--handshake-timeout", "4s", "--shutdown-timeout", "1.5s",
        "--log-level", "warn", "--log-format", "json",
    ])
    assert config == RelayConfig(
        ports=("tcp:4000:interface=127.0.0.1", "tcp6:4001"), rate_limit=7, rate_window=0.5,
        room_expiry=7200.0, cleanup_interval=300.0, max_message_size=65536,
        ping_interval=0.0, ping_timeout=3.0, handshake_timeout=4.0, shutdown_timeout=1.5,
        log_level="warn", log_format="json",
    )


def test_environment_and_the_command_line_wins():
    environ = {
        "IWRELAY_RATE_LIMIT": "200", "IWRELAY_ROOM_EXPIRY": "1h", "IWRELAY_LOG_FORMAT": "json",
        "IWRELAY_PORT": "tcp:5000 tcp:5001",
    }
    config = parse(["--rate-limit", "300"], environ)
    assert config.rate_limit == 300
    assert config.room_expiry == 3600.0
    assert config.log_format == "json"
    assert config.ports == ("tcp:5000", "tcp:5001")


def test_the_originals_variables():
    config = parse([], {"PORT": "8080", "LOG_LEVEL": "debug", "NODE_ENV": "production"})
    assert config.ports == ("tcp:8080",)
    assert (config.log_level, config.log_format) == ("debug", "json")
    assert parse([], {"NODE_ENV": "development"}).log_format == "text"
    # IWRELAY_* wins over the original's variables, --port over both.
    assert parse([], {"PORT": "8080", "IWRELAY_PORT": "tcp:9"}).ports == ("tcp:9",)
    assert parse(["--port", "tcp:7"], {"PORT": "8080"}).ports == ("tcp:7",)


@pytest.mark.parametrize(("args", "environ", "named"), [
    (["--rate-limit", "abc"], {}, "--rate-limit"),
    (["--rate-limit", "0"], {}, "--rate-limit"),
    (["--room-expiry", "5x"], {}, "--room-expiry"),
    (["--rate-window", "0s"], {}, "--rate-window"),
    (["--max-message-size", "1MB"], {}, "--max-message-size"),
    (["--log-level", "loud"], {}, "--log-level"),
    (["--log-format", "xml"], {}, "--log-format"),
    (["--port", "tcp:notaport"], {}, "--port"),
    (["--port", "ssl:443:privateKey=/nonexistent.pem"], {}, "--port"),
    ([], {"IWRELAY_RATE_WINDOW": "zz"}, "IWRELAY_RATE_WINDOW"),
    ([], {"PORT": "http"}, "^PORT: 'http' is not a TCP port number"),
    ([], {"PORT": "abc"}, "^PORT: 'abc'"),
    ([], {"IWRELAY_PORT": "tcp:notaport"}, "^IWRELAY_PORT 'tcp:notaport'"),
    ([], {"LOG_LEVEL": "loud"}, "^LOG_LEVEL: 'loud'"),
    ([], {"IWRELAY_STUN_URI": "stun:a.example stun:"}, "^IWRELAY_STUN_URI: 'stun:'"),
    ([], {"IWRELAY_DEMO": "maybe"}, "^IWRELAY_DEMO: 'maybe'"),
])
def test_bad_values_name_the_option(args, environ, named):
    with pytest.raises(usage.UsageError, match=named):
        parse(args, environ)


def test_hardening_options(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(b"from-a-file\n")
    config = parse([
        "--max-connections", "1000", "--max-connections-per-ip", "0", "--max-room-size", "50",
        "--flood-windows", "5", "--max-send-buffer", "256KiB",
        "--allowed-origin", "https://Editor.example.org:443/",
        "--allowed-origin", "http://localhost:8080",
        "--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "::1",
        "--auth-secret-file", str(secret_file),
    ])
    assert (config.max_connections, config.max_connections_per_ip) == (1000, 0)
    assert (config.max_room_size, config.flood_windows) == (50, 5)
    assert config.max_send_buffer == 256 * 1024
    assert config.allowed_origins == ("https://editor.example.org", "http://localhost:8080")
    assert config.trusted_proxies == ("10.0.0.0/8", "::1/128")
    assert config.auth_secret == b"from-a-file"
    assert "from-a-file" not in repr(config)
    defaults = RelayConfig()
    assert (defaults.max_connections, defaults.max_connections_per_ip) == (0, 64)
    assert (defaults.max_room_size, defaults.flood_windows) == (0, 10)
    assert (defaults.allowed_origins, defaults.trusted_proxies, defaults.auth_secret) == (
        (), (), None)


def test_hardening_options_from_the_environment():
    config = parse([], {
        "IWRELAY_ALLOWED_ORIGIN": "https://a.example https://b.example:8443",
        "IWRELAY_TRUSTED_PROXY": "127.0.0.1", "IWRELAY_AUTH_SECRET": "env-secret",
        "IWRELAY_MAX_ROOM_SIZE": "3",
    })
    assert config.allowed_origins == ("https://a.example", "https://b.example:8443")
    assert config.trusted_proxies == ("127.0.0.1/32",)
    assert (config.auth_secret, config.max_room_size) == (b"env-secret", 3)


@pytest.mark.parametrize(("args", "named"), [
    (["--allowed-origin", "editor.example.org"], "--allowed-origin"),
    (["--trusted-proxy", "10.0.0.0/33"], "--trusted-proxy"),
    (["--auth-secret-file", "/nonexistent/secret"], "--auth-secret-file"),
    (["--auth-secret", "a", "--auth-secret-file", "/etc/hostname"], "--auth-secret"),
    (["--max-connections-per-ip", "-1"], "--max-connections-per-ip"),
    (["--flood-windows", "many"], "--flood-windows"),
])
def test_bad_hardening_values(args, named):
    with pytest.raises(usage.UsageError, match=named):
        parse(args)


def test_make_service_builds_the_tree():
    options = Options(environ={}, reactor=Clock())
    options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--port", "tcp:0"])
    service = makeService(options)
    children = list(service)
    # The registry first, the two listeners last (so that they stop first).
    assert children[0] is service.registry
    assert [type(child).__name__ for child in children[1:]] == [
        "StreamServerEndpointService", "StreamServerEndpointService"]


def test_open_files_limit_is_raised_to_the_hard_limit():
    import resource

    from iw_relay.tap import raise_open_files_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lower = min(soft, 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
    try:
        raised = raise_open_files_limit()
        now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raised == now
        assert now == (hard if hard != resource.RLIM_INFINITY else max(lower, 1 << 20))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- the option table ------------------------------------------------------------------


def test_every_setting_has_its_options_default():
    """RelayConfig's fields are the table's, with the table's defaults."""
    fields = {f.name: f for f in dataclasses.fields(RelayConfig)}
    assert {option.field for option in OPTIONS} == set(fields)
    for option in OPTIONS:
        assert fields[option.field].default == option.default_value(), option.name
    assert len({option.name for option in OPTIONS}) == len(OPTIONS)


def test_help_is_made_from_the_table():
    text = str(Options(environ={}, reactor=Clock()))
    flat = "".join(text.split())  # --help wraps lines, even inside long words
    for option in OPTIONS:
        assert f"--{option.name}" in text
        assert "".join(help_text(option).split()) in flat, option.name
    assert "[default: 1s]" in help_text(next(o for o in OPTIONS if o.name == "rate-window"))
    # A default is written once, in the table, not also in the help.
    assert not any("default" in option.help.lower() for option in OPTIONS)


def _example(option):
    """A valid value for `option`: its default, or a sample of its kind."""
    samples = {"SECRET": "s3cret", "ORIGIN": "https://a.example", "CIDR": "10.0.0.0/8",
               "URL": "redis://127.0.0.1:6379/0", "ENDPOINT": "tcp:0:interface=127.0.0.1"}
    if option.name == "turn-uri":
        return "turn:turn.example:3478"
    if option.name == "stun-uri":
        return "stun:stun.example:3478"
    return option.default or samples[option.metavar]


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.kind != "flag"
                                    and not o.name.endswith("-file")], ids=lambda o: o.name)
def test_every_option_from_the_command_line_and_the_environment(option):
    value = _example(option)
    # TURN URIs and the TURN secret are only valid together.
    companion = {"turn-uri": ("turn-secret", "x"),
                 "turn-secret": ("turn-uri", "turn:t.example")}.get(option.name)
    extra = [f"--{companion[0]}", companion[1]] if companion else []
    env_extra = {env_name(companion[0]): companion[1]} if companion else {}
    from_args = parse([f"--{option.name}", value, *extra])
    from_env = parse([], {option.env: value, **env_extra})
    expected = option.parse(value)
    if option.kind == "list":
        expected = (expected,)
    assert getattr(from_args, option.field) == getattr(from_env, option.field) == expected


def test_flag_from_the_command_line_and_the_environment():
    assert parse(["--demo"]).demo is True
    assert parse([], {"IWRELAY_DEMO": "yes"}).demo is True
    assert parse([], {"IWRELAY_DEMO": "0"}).demo is False
