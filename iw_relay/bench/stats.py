"""Figures of a benchmark step: percentiles, the step report, saturation, formatting.

Nothing here does I/O, so all of it is unit tested on plain numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# A step is within the relay's capacity when its p99 latency is below this, with no loss.
P99_LIMIT_MS = 100.0
PERCENTILES = (50, 90, 99)


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """The nearest-rank `q`-th percentile (0 < q <= 100) of an ascending sequence.

    The smallest value such that at least q % of the values are at or below it; None
    for no values. p100 is the maximum.
    """
    if not 0 < q <= 100:
        raise ValueError(f"percentile {q} is not in (0, 100]")
    count = len(ordered)
    if count == 0:
        return None
    rank = math.ceil(q / 100 * count)
    return ordered[max(rank, 1) - 1]


def latency_summary(samples_ns: Iterable[int]) -> dict[str, float | int | None]:
    """p50, p90, p99 and max in milliseconds (None when there is no sample), and count."""
    ordered = sorted(samples_ns)
    summary: dict[str, float | int | None] = {"count": len(ordered)}
    for q in PERCENTILES:
        value = percentile(ordered, q)
        summary[f"p{q}"] = None if value is None else value / 1e6
    summary["max"] = ordered[-1] / 1e6 if ordered else None
    return summary


def median(values: Sequence[float]) -> float | None:
    """The median (mean of the middle two for an even count); None for no values."""
    ordered = sorted(values)
    count = len(ordered)
    if count == 0:
        return None
    middle = count // 2
    if count % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def expected_deliveries(sent_by_room: dict[str, int], room_sizes: dict[str, int]) -> int:
    """Every message is delivered to every other member of its sender's room."""
    return sum(sent * (room_sizes[room] - 1) for room, sent in sent_by_room.items())


@dataclass
class ProcessUsage:
    """CPU time and resident memory of a process (the server or the generator) over a
    step; `cpu_s` is user + system time spent during it."""

    cpu_s: float | None = None
    wall_s: float | None = None
    rss_bytes: int | None = None
    rss_start_bytes: int | None = None

    @property
    def cpu_percent(self) -> float | None:
        if self.cpu_s is None or not self.wall_s:
            return None
        return 100.0 * self.cpu_s / self.wall_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "cpu_s": _round(self.cpu_s, 4),
            "wall_s": _round(self.wall_s, 4),
            "cpu_percent": _round(self.cpu_percent, 1),
            "rss_bytes": self.rss_bytes,
            "rss_start_bytes": self.rss_start_bytes,
        }


@dataclass
class StepReport:
    """What one step measured. Rates are per second of the step's sending window."""

    scenario: str
    step: int
    duration_s: float
    connections: int = 0
    rooms: int = 0
    senders: int = 0
    rate_per_sender: float | None = None
    sent: int = 0
    expected: int = 0
    delivered: int = 0
    stale: int = 0
    errors: int = 0
    failures: int = 0
    latency_ms: dict[str, float | int | None] = field(default_factory=dict)
    server: ProcessUsage | None = None
    generator: ProcessUsage | None = None
    generator_lagging: bool = False
    # Scenario-specific figures (connections per second, bytes per connection...).
    extra: dict[str, Any] = field(default_factory=dict)
    # What the per-unit server CPU figure divides by: "delivery", "connection", "cycle".
    unit: str = "delivery"
    units: int | None = None
    # Whether the p99 limit applies (not to connect and idle, whose latency is a handshake).
    latency_bound: bool = True

    @property
    def offered_per_s(self) -> float:
        return self.sent / self.duration_s if self.duration_s else 0.0

    @property
    def expected_per_s(self) -> float:
        return self.expected / self.duration_s if self.duration_s else 0.0

    @property
    def delivered_per_s(self) -> float:
        return self.delivered / self.duration_s if self.duration_s else 0.0

    @property
    def loss(self) -> int:
        return self.expected - self.delivered

    @property
    def loss_ratio(self) -> float:
        return self.loss / self.expected if self.expected else 0.0

    @property
    def server_cpu_us_per_unit(self) -> float | None:
        units = self.delivered if self.units is None else self.units
        if self.server is None or self.server.cpu_s is None or not units:
            return None
        return self.server.cpu_s * 1e6 / units

    @property
    def ok(self) -> bool:
        """No loss, no failure, and p99 below the limit (when there are latencies)."""
        p99 = self.latency_ms.get("p99")
        return (self.loss == 0 and self.failures == 0
                and (p99 is None or not self.latency_bound or p99 < P99_LIMIT_MS))

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "step",
            "scenario": self.scenario,
            "step": self.step,
            "duration_s": _round(self.duration_s, 4),
            "connections": self.connections,
            "rooms": self.rooms,
            "senders": self.senders,
            "rate_per_sender": self.rate_per_sender,
            "sent": self.sent,
            "offered_msgs_per_s": _round(self.offered_per_s, 1),
            "expected_deliveries": self.expected,
            "delivered": self.delivered,
            "expected_per_s": _round(self.expected_per_s, 1),
            "delivered_per_s": _round(self.delivered_per_s, 1),
            "loss": self.loss,
            "loss_ratio": _round(self.loss_ratio, 6),
            "stale": self.stale,
            "errors": self.errors,
            "failures": self.failures,
            "latency_ms": {k: _round(v, 3) if k != "count" else v
                           for k, v in self.latency_ms.items()},
            "server": None if self.server is None else {
                **self.server.as_dict(),
                f"cpu_us_per_{self.unit}": _round(self.server_cpu_us_per_unit, 2),
            },
            "generator": None if self.generator is None else {
                **self.generator.as_dict(), "lagging": self.generator_lagging,
            },
            "ok": self.ok,
            **self.extra,
        }


def saturation(steps: Sequence[StepReport]) -> StepReport | None:
    """The step with the highest delivery rate among those that are `ok` (p99 below
    P99_LIMIT_MS, no loss); None when no step is."""
    passing = [step for step in steps if step.ok and step.delivered]
    if not passing:
        return None
    return max(passing, key=lambda step: step.delivered_per_s)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def human_bytes(count: float | None) -> str:
    if count is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:.0f} B"


def _ms(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_step(report: StepReport) -> str:
    """One human-readable line for a step."""
    parts = [f"{report.scenario} #{report.step}"]
    if report.rate_per_sender is not None:
        parts.append(f"rate {report.rate_per_sender:g}/s/sender")
    if report.sent:
        parts.append(f"offered {report.offered_per_s:,.0f} msg/s")
    if report.expected or report.delivered:
        parts.append(
            f"deliveries {report.delivered_per_s:,.0f}/{report.expected_per_s:,.0f} per s"
            f" (loss {report.loss})"
        )
    for key, label in (("conns_per_s", "conn/s"), ("cycles_per_s", "cycles/s")):
        if key in report.extra:
            parts.append(f"{report.extra[key]:,.0f} {label}")
    if "bytes_per_connection" in report.extra:
        parts.append(f"{report.connections} conns "
                     f"{human_bytes(report.extra['bytes_per_connection'])}/conn")
    lat = report.latency_ms
    if lat.get("count"):
        parts.append(f"lat p50 {_ms(lat['p50'])} p90 {_ms(lat['p90'])} "
                     f"p99 {_ms(lat['p99'])} max {_ms(lat['max'])} ms")
    server = report.server
    if server is not None and server.cpu_s is not None:
        text = f"server cpu {server.cpu_percent:.0f}%"
        per_unit = report.server_cpu_us_per_unit
        if per_unit is not None:
            text += f" {per_unit:.1f} us/{report.unit}"
        text += f" rss {human_bytes(server.rss_bytes)}"
        parts.append(text)
    generator = report.generator
    if generator is not None and generator.cpu_percent is not None:
        parts.append(f"gen cpu {generator.cpu_percent:.0f}%"
                     + (" LAGGING" if report.generator_lagging else ""))
    if report.errors:
        parts.append(f"errors {report.errors}")
    if report.failures:
        parts.append(f"failures {report.failures}")
    parts.append("ok" if report.ok else "SATURATED" if report.expected else "FAILED")
    return "  ".join(parts)
