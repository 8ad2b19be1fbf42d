"""Log output: level filtering, human text or one JSON object per line, redaction.

The relay's own events never carry a room id (only `room_hash`), a token, a request URI
nor a message body. Autobahn's and txaio's debug and info events can carry request paths,
which hold room ids and tokens, so events from those libraries only pass at warn and
above. Any other event from a library (Twisted's "HEAD request <Request ... uri=...>"
warning, for one) that looks as if it carries a request line, a path or a query is
written with its text withheld: only its level and namespace remain.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import IO, Any, cast

import txaio
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
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
_OWN_NAMESPACE = "iw_relay"
# What a request line, a URI, a path or a query looks like inside a library's message.
_REQUEST_LIKE = re.compile(
    r"/room|[?&;][\w.-]*=|\b(?:room|token|uri|path)\b|https?://|wss?://|HTTP/\d|"
    r"\b(?:GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH|TRACE|CONNECT) +/",
    re.IGNORECASE)
WITHHELD = "message withheld: it may carry a request path"


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


def _carries_request(event: dict[str, Any]) -> bool:
    """Whether a library's event text (or its failure's message) looks like it holds a
    request line, a URI, a path or a query."""
    try:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getErrorMessage()
        text += "\n" + " ".join(str(value) for key, value in event.items()
                         if not key.startswith("log_") and _primitive(value))
    except Exception:
        return True
    return _REQUEST_LIKE.search(text) is not None


def redacted(event: dict[str, Any]) -> dict[str, Any]:
    """`event`, or, for a library's event that may carry a request path, a copy that
    keeps only its time, level, namespace and system."""
    namespace = event.get("log_namespace") or ""
    if namespace.startswith(_OWN_NAMESPACE) or not _carries_request(event):
        return event
    kept: dict[str, Any] = {key: event[key] for key in ("log_time", "log_level", "log_namespace",
                                         "log_system") if key in event}
    return {**kept, "log_format": WITHHELD}


@implementer(ILogObserver)
class RedactingObserver:
    """Passes every event on to `inner`, redacted (see `redacted`)."""

    def __init__(self, inner: ILogObserver) -> None:
        self._inner = inner

    def __call__(self, event: dict[str, Any]) -> None:
        self._inner(redacted(event))


def make_observer(config: RelayConfig, out: IO[str]) -> ILogObserver:
    """The observer for `config`'s log level and format, writing to `out`."""
    inner = JsonLinesObserver(out) if config.log_format == "json" else textFileLogObserver(out)
    levels = LogLevelFilterPredicate(defaultLogLevel=LEVELS[config.log_level])
    # A plain function serves as a predicate: the observer only calls it.
    quiet = cast(ILogFilterPredicate, _quiet_libraries)
    return FilteringLogObserver(RedactingObserver(inner), [quiet, levels])


def quiet_autobahn() -> None:
    """Make Autobahn's debug calls no-ops: they cost CPU even when nobody reads them."""
    # txaio fills in its API at run time (txaio.use_twisted): the type checker cannot see it.
    txaio.set_global_log_level("info")  # type: ignore[attr-defined]
