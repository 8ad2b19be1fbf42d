"""Fixed-window message limiter, the same windows as the original relay."""

from __future__ import annotations


class FixedWindowLimiter:
    """At most `limit` messages per `window` seconds.

    The first window starts when the connection opens; a new one starts at the first
    message after the previous one ended (so an idle connection has no timer at all).
    """

    __slots__ = ("_count", "_window_start", "flooded_windows", "limit", "window")

    def __init__(self, limit: int, window: float, now: float) -> None:
        self.limit = limit
        self.window = window
        self._window_start = now
        self._count = 0
        #: Consecutive windows in which the limit was exceeded (a flood, not a burst).
        self.flooded_windows = 0

    def allow(self, now: float) -> bool:
        """Count one message at `now`; False when it is over the limit."""
        if now - self._window_start >= self.window:
            if self._count <= self.limit or now - self._window_start >= 2 * self.window:
                self.flooded_windows = 0  # the last window kept the limit, or one was idle
            self._window_start = now
            self._count = 0
        self._count += 1
        if self._count <= self.limit:
            return True
        if self._count == self.limit + 1:
            self.flooded_windows += 1
        return False

    @property
    def first_refusal(self) -> bool:
        """True right after the first message of this window that was refused."""
        return self._count == self.limit + 1
