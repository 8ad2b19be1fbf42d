"""Log output: level filtering, human text or one JSON object per line, redaction.

The relay's own events never carry a room id (only `room_hash`), a token, a request URI
nor a message body. Autobahn's and txaio's debug and info events can carry request paths,
which hold room ids and tokens, so events from those libraries only pass at warn and
above. Any other event from a library (Twisted's "HEAD request <Request ... uri=...>"
warning, for one) that looks as if it carries a request line, a path or a query is
written with its text withheld: only its level and namespace remain.

The relay's own events (two per connection: "joined", "left") take a short path
(`RelayLogObserver`) that writes the same text as Twisted's chain would; everything else
goes through that chain.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import IO, Any, cast

import txaio
from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    formatTime,
    textFileLogObserver,
    timeFormatRFC3339,
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


# An event with any of these keys is not plain: Twisted's formatting handles it.
_NOT_PLAIN = ("log_system", "log_failure", "log_flattened", "log_trace")


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
            "message": _message(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in record and _primitive(value):
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self._out.write(json.dumps(record, default=str) + "\n")
        self._out.flush()


def _plain_message(event: dict[str, Any]) -> str | None:
    """The text of one of the relay's own events whose format str.format_map renders
    exactly as Twisted's formatEvent does (no call syntax, no system, failure nor
    flattening); None for any other event, or one that does not format."""
    text = event.get("log_format")
    if (type(text) is not str or "()" in text
            or not (event.get("log_namespace") or "").startswith(_OWN_NAMESPACE)):
        return None
    for key in _NOT_PLAIN:
        if key in event:
            return None
    try:
        return text.format_map(event)
    except Exception:  # Twisted's formatEvent says what could not be formatted
        return None


def _message(event: dict[str, Any]) -> str:
    """formatEvent(event), without Twisted's string.Formatter for a plain event."""
    message = _plain_message(event)
    return formatEvent(event) if message is None else message


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


@implementer(ILogObserver)
class RelayLogObserver:
    """`config`'s level filter, quiet libraries, redaction and format, in one call.

    Twisted's chain (FilteringLogObserver and its predicates, RedactingObserver,
    FileLogObserver, string.Formatter, strftime) costs ~45 us a line, and each connection
    writes two. The relay's own events pass the library filter and redaction as they are
    (they never carry request data): they skip both, and in text a plain one is written
    here, the same text Twisted's observer writes (format_map, the timestamp made once a
    second). Every other event goes through the whole chain.
    """

    def __init__(self, config: RelayConfig, out: IO[str]) -> None:
        minimum = LEVELS[config.log_level]
        self._passing = frozenset(level for level in LogLevel.iterconstants()
                                  if level >= minimum)
        self._text = config.log_format != "json"
        self._out = out
        self._second: int | None = None
        self._stamp = ""
        self._inner = textFileLogObserver(out) if self._text else JsonLinesObserver(out)
        levels = LogLevelFilterPredicate(defaultLogLevel=minimum)
        # A plain function serves as a predicate: the observer only calls it.
        quiet = cast(ILogFilterPredicate, _quiet_libraries)
        self._chain = FilteringLogObserver(RedactingObserver(self._inner), [quiet, levels])

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_level") not in self._passing:
            return  # as LogLevelFilterPredicate would (also an event without a level)
        namespace = event.get("log_namespace")
        if (type(namespace) is not str or not namespace.startswith(_OWN_NAMESPACE)
                or "log_trace" in event):
            self._chain(event)
            return
        message = _plain_message(event) if self._text else None
        if message and type(event.get("log_time")) is float:
            # formatEventAsClassicLogText's layout
            system = f"{namespace}#{event['log_level'].name}"
            line = f"{self._timestamp(event['log_time'])} [{system}] {message}"
            self._out.write(line.replace("\n", "\n\t") + "\n")
            self._out.flush()
        else:
            self._inner(event)

    def _timestamp(self, when: float) -> str:
        """formatTime(when), made once a second (the format shows whole seconds)."""
        second = int(when)
        if second != self._second:
            self._second, self._stamp = second, formatTime(when, timeFormatRFC3339)
        return self._stamp


def make_observer(config: RelayConfig, out: IO[str]) -> ILogObserver:
    """The observer for `config`'s log level and format, writing to `out`."""
    return RelayLogObserver(config, out)


def quiet_autobahn() -> None:
    """Make Autobahn's debug calls no-ops: they cost CPU even when nobody reads them."""
    # txaio fills in its API at run time (txaio.use_twisted): the type checker cannot see it.
    txaio.set_global_log_level("info")  # type: ignore[attr-defined]


class RefusalLog:
    """``refused N connection(s): REASON``, at most one line per reason a second, N being
    the refusals since that reason's previous line: a refusal costs the client nothing
    (a bad room id, a bad token, a full room, a connection limit), so it must not cost a
    log line each. The refusals after a reason's last line are written with its next
    one (``iwrelay_handshakes_refused`` counts the limits' at once). `reason` is one of
    a few fixed texts, never anything the client sent (the reasons kept are bounded by
    that)."""

    _log = Logger()

    def __init__(self, clock: IReactorTime, interval: float = 1.0) -> None:
        self._clock = clock
        self._interval = interval
        self._last_logged: dict[str, float] = {}
        self._since_logged: dict[str, int] = {}

    def __call__(self, reason: str) -> None:
        now = self._clock.seconds()
        self._since_logged[reason] = self._since_logged.get(reason, 0) + 1
        if now - self._last_logged.get(reason, float("-inf")) >= self._interval:
            self._last_logged[reason] = now
            self._log.info("refused {count} connection(s): {reason}",
                           count=self._since_logged.pop(reason), reason=reason)
