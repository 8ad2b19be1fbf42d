"""CPU time and resident memory of a process, read from Linux's /proc."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of `pid`, in seconds (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        text = stat.read()
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(b")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` (VmRSS of /proc/PID/status), in bytes."""
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"process {pid} has no VmRSS (a zombie?)")


@dataclass(frozen=True)
class Sample:
    """One reading of a process: CPU seconds so far, RSS, and when (monotonic)."""

    cpu_s: float
    rss: int
    at: float

    @classmethod
    def of(cls, pid: int) -> Sample:
        return cls(cpu_seconds(pid), rss_bytes(pid), time.monotonic())


def check_pid(pid: int) -> None:
    """ValueError unless `pid` is a process whose /proc entries this user can read."""
    try:
        Sample.of(pid)
    except (OSError, ValueError) as problem:
        raise ValueError(f"cannot read /proc/{pid}: {problem}") from None
