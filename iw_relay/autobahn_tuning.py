"""Stop Autobahn from formatting debug-log arguments nobody reads.

Autobahn builds the arguments of its debug log calls before the call, whatever the log
level: on every new connection it pretty-prints its whole configuration (`pformat`), and
it colours type names and values (`hltype`, `hlval`, through click) on several paths.
That was ~40% of the CPU spent per new connection. `apply()` replaces those helpers, in
the Autobahn modules the relay uses, by cheap equivalents that still give plain text,
and by the real ones whenever txaio's log level is debug or trace.
"""

from __future__ import annotations

import pprint
from typing import Any

import txaio
from autobahn import util
from autobahn.twisted import websocket as twisted_websocket
from autobahn.websocket import protocol as websocket_protocol

_VERBOSE = ("debug", "trace")
_debugging_when_applied = False


def _debugging() -> bool:
    # Read once, in apply(): these helpers run several times per message.
    return _debugging_when_applied


def _pformat(obj: Any, *args: Any, **kwargs: Any) -> str:
    return pprint.pformat(obj, *args, **kwargs) if _debugging() else ""


def _hltype(obj: Any) -> str:
    if _debugging():
        return util.hltype(obj)
    return getattr(obj, "__qualname__", type(obj).__qualname__)


def _hlval(val: Any, *args: Any, **kwargs: Any) -> str:
    return util.hlval(val, *args, **kwargs) if _debugging() else f"{val}"


def apply() -> None:
    """Idempotent; affects only how Autobahn's log arguments are built. Call it again
    after changing txaio's log level."""
    global _debugging_when_applied
    _debugging_when_applied = txaio.get_global_log_level() in _VERBOSE
    websocket_protocol.pformat = _pformat
    for module in (websocket_protocol, twisted_websocket):
        module.hltype = _hltype
        module.hlval = _hlval
