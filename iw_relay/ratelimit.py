"""The per-connection rate limit: a token bucket refilled once per window, and the flood
rule that closes a connection which keeps going over it.

- `limit` tokens are added at each new window, up to `burst` tokens (the bucket's
  capacity). Every counted frame takes one; a frame that finds the bucket empty is
  refused. With ``burst == limit`` (the default) this is exactly the original relay's fixed
  window: a burst of 150 lets 100 through, and the whole allowance is back one window
  later. A larger burst lets a client that was quiet spend what it saved, e.g. an editor
  flushing the ~160 frames it queued while offline.
- Windows are the original's: the first starts when the connection opens, a new one at
  the first frame after the previous one ended (an idle connection has no timer).
- Flood rule: a window with a refusal adds one to `flooded_windows`, a window without one
  (an idle window too) takes one off, never below zero. The caller closes the connection
  when it reaches --flood-windows, so a flood that pauses now and then (bursts with a
  2.2 s pause every 8 s) still adds up, while an occasional burst is forgotten.
- `overdrawn`: refused as many frames in this window as the limit allows, i.e. sent at
  least twice its allowance. The caller then stops reading the connection until
  `window_end`, so a flood costs the server a bounded amount of work per window.
"""

from __future__ import annotations


class TokenBucket:
    """At most `limit` frames per `window` seconds on average, `burst` at once.

    The three numbers are the same for every connection: `TokenBucket.rule(...)` makes a
    subclass holding them, so that each connection's bucket holds only its own state.
    """

    __slots__ = ("_refused", "_window_start", "flooded_windows", "tokens")
    limit: int = 100
    window: float = 1.0
    burst: int = 100

    @classmethod
    def rule(cls, limit: int, window: float, burst: int | None = None
             ) -> type[TokenBucket]:
        """The bucket class for `limit` frames per `window` s, `burst` (or `limit`) at once."""
        return type(cls.__name__, (cls,), {"__slots__": (), "limit": limit, "window": window,
                                           "burst": burst or limit})

    def __init__(self, now: float) -> None:
        self.tokens = self.burst
        self._window_start = now
        self._refused = 0
        #: Windows over the limit, less those within it (see the module's docstring).
        self.flooded_windows = 0

    def allow(self, now: float) -> bool:
        """Take one token at `now`; False (and counted as refused) when there is none."""
        elapsed = now - self._window_start
        if elapsed >= self.window:
            self._new_window(elapsed)
            self._window_start = now
        if self.tokens:
            self.tokens -= 1
            return True
        self._refused += 1
        if self._refused == 1:
            self.flooded_windows += 1
        return False

    def _new_window(self, elapsed: float) -> None:
        windows = int(elapsed // self.window)  # the one that ended, and idle ones after it
        quiet = windows - 1 if self._refused else windows
        self.flooded_windows = max(0, self.flooded_windows - quiet)
        self.tokens = min(self.burst, self.tokens + windows * self.limit)
        self._refused = 0

    @property
    def first_refusal(self) -> bool:
        """True right after the first refused frame of this window (one error a window)."""
        return self._refused == 1

    @property
    def overdrawn(self) -> bool:
        """This window has refused as many frames as the limit allows."""
        return self._refused >= self.limit

    @property
    def window_end(self) -> float:
        return self._window_start + self.window
