"""Log output: level filtering, human text or one JSON object per line.

The relay's own events never carry a room id (only `room_hash`) nor a message body.
Autobahn's and txaio's debug and info events can carry request paths, which hold room
ids, so events from those libraries only pass at warn and above.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import IO, Any

import txaio
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import implementer

from iw_relay.config import RelayConfig

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}
_CHATTY_LIBRARIES = ("autobahn", "txaio")


def _primitive(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


@implementer(ILogObserver)
class JsonLinesObserver:
    """One plain JSON object per line, for log shippers (not Twisted's own JSON format)."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        record = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": level.name,
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in record and _primitive(value):
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self._out.write(json.dumps(record, default=str) + "\n")
        self._out.flush()


def _quiet_libraries(event: dict[str, Any]) -> PredicateResult:
    namespace = event.get("log_namespace") or ""
    level = event.get("log_level", LogLevel.info)
    if namespace.startswith(_CHATTY_LIBRARIES) and level < LogLevel.warn:
        return PredicateResult.no
    return PredicateResult.maybe


def make_observer(config: RelayConfig, out: IO[str]) -> ILogObserver:
    """The observer for `config`'s log level and format, writing to `out`."""
    inner = JsonLinesObserver(out) if config.log_format == "json" else textFileLogObserver(out)
    levels = LogLevelFilterPredicate(defaultLogLevel=LEVELS[config.log_level])
    return FilteringLogObserver(inner, [_quiet_libraries, levels])


def quiet_autobahn() -> None:
    """Make Autobahn's debug calls no-ops: they cost CPU even when nobody reads them."""
    txaio.set_global_log_level("info")
