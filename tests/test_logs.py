"""iw_relay.logs: the short path for the relay's own events writes what Twisted's chain
(FilteringLogObserver, RedactingObserver, textFileLogObserver or JsonLinesObserver)
writes for the same events, in both formats and at every level."""

from __future__ import annotations

import io
from typing import Any, cast

import pytest
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    LogLevel,
    LogLevelFilterPredicate,
    textFileLogObserver,
)
from twisted.python.failure import Failure

from iw_relay import logs
from iw_relay.config import RelayConfig

OWN = "iw_relay.registry.RoomRegistry"
# Around a second's boundary, so the once-a-second timestamp must change in between.
TIMES = (1_764_000_000.25, 1_764_000_000.999, 1_764_000_001.0, 1_764_000_001.5,
         1_764_003_601.75)


def _failure() -> Failure:
    try:
        raise ValueError("boom")
    except ValueError:
        return Failure()


def events() -> list[dict[str, Any]]:
    """Own events of every shape (plain or not), and other libraries' events."""
    made: list[dict[str, Any]] = []
    for when in TIMES:
        for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error):
            made.append({"log_format": "{connection_id} joined room {room} ({count} members)",
                         "connection_id": "ecce0c52f4429c96", "room": "40f32168011f",
                         "count": 3, "log_namespace": OWN, "log_level": level,
                         "log_time": when})
    made += [
        {"log_format": "two\nlines {x!r:>6}", "x": "é", "log_namespace": OWN,
         "log_level": LogLevel.info, "log_time": TIMES[0]},
        {"log_format": "calls {f()}", "f": lambda: "made", "log_namespace": OWN,
         "log_level": LogLevel.info, "log_time": TIMES[0]},
        {"log_format": "missing {nothing}", "log_namespace": OWN,
         "log_level": LogLevel.info, "log_time": TIMES[0]},
        {"log_format": "{}", "log_namespace": OWN, "log_level": LogLevel.info,
         "log_time": TIMES[0]},
        {"log_format": "", "log_namespace": OWN, "log_level": LogLevel.info,
         "log_time": TIMES[0]},
        {"log_format": None, "log_namespace": OWN, "log_level": LogLevel.info,
         "log_time": TIMES[0]},
        {"log_format": "failed", "log_failure": _failure(), "log_namespace": OWN,
         "log_level": LogLevel.critical, "log_time": TIMES[1]},
        {"log_format": "system", "log_system": "-", "log_namespace": OWN,
         "log_level": LogLevel.info, "log_time": TIMES[1]},
        {"log_format": "no time", "log_namespace": OWN, "log_level": LogLevel.info},
        {"log_format": "no level", "log_namespace": OWN, "log_time": TIMES[1]},
        {"log_format": "request GET /room/abc?token=x HTTP/1.1",
         "log_namespace": "twisted.web", "log_level": LogLevel.warn, "log_time": TIMES[2]},
        {"log_format": "chatty {x}", "x": "/room/abc", "log_namespace": "autobahn.x",
         "log_level": LogLevel.info, "log_time": TIMES[2]},
        {"log_format": "no namespace", "log_level": LogLevel.info, "log_time": TIMES[2]},
        {"log_format": "own-looking {x}", "x": 1, "log_namespace": "iw_relayer",
         "log_level": LogLevel.info, "log_time": TIMES[3]},
    ]
    return made


def twisted_chain(config: RelayConfig, out: io.StringIO) -> FilteringLogObserver:
    """The observer the relay used before its short path: Twisted's own chain."""
    inner = (logs.JsonLinesObserver(out) if config.log_format == "json"
             else textFileLogObserver(out))
    levels = LogLevelFilterPredicate(defaultLogLevel=logs.LEVELS[config.log_level])
    quiet = cast(ILogFilterPredicate, logs._quiet_libraries)
    return FilteringLogObserver(logs.RedactingObserver(inner), [quiet, levels])


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("log_level", ["debug", "info", "warn", "error"])
def test_every_line_is_what_twisteds_chain_writes(log_format, log_level):
    config = RelayConfig(log_format=log_format, log_level=log_level)
    ours, theirs = io.StringIO(), io.StringIO()
    observer, reference = logs.make_observer(config, ours), twisted_chain(config, theirs)
    for event in events():
        observer(dict(event))
        reference(dict(event))
    assert ours.getvalue().splitlines() == theirs.getvalue().splitlines()
    assert "joined room" in ours.getvalue()  # something was written, at every level


def test_the_short_path_writes_the_relays_own_plain_lines():
    """The comparison above covers the short path: a plain event never reaches the chain."""
    out = io.StringIO()
    observer = logs.RelayLogObserver(RelayConfig(), out)
    observer._chain = observer._inner = None  # type: ignore[assignment]
    observer(events()[1])
    assert out.getvalue().endswith(
        f" [{OWN}#info] ecce0c52f4429c96 joined room 40f32168011f (3 members)\n")
