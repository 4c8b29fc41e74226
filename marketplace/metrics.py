"""Prometheus text exposition, written by hand (no extra dependency)."""

from __future__ import annotations

import bisect
from collections import Counter

__all__ = ["Histogram", "Metrics"]

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str) -> list[str]:
        lines = []
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            cumulative += n
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {self.sum:.6f}")
        lines.append(f"{name}_count {self.count}")
        return lines


class Metrics:
    """Counters the relay updates; ``render`` adds the ledger's and registry's state."""

    def __init__(self) -> None:
        self.relay_seconds = Histogram()
        self.first_byte_seconds = Histogram()
        self.record_seconds = Histogram()  # the durable in-flight insert
        self.bytes_relayed: Counter[str] = Counter()  # "request" / "response"
        self.attempts: Counter[str] = Counter()  # node attempts by outcome

    def render(
        self, jobs_by_status: dict[str, int], nodes_admitted: int, nodes_healthy: int
    ) -> str:
        from marketplace.db import JobStatus

        out = [
            "# HELP imago_jobs Jobs recorded, by status.",
            "# TYPE imago_jobs gauge",
        ]
        for status in JobStatus:
            out.append(f'imago_jobs{{status="{status.value}"}} {jobs_by_status.get(status, 0)}')
        out += [
            "# HELP imago_nodes_admitted Nodes whose attestation verified.",
            "# TYPE imago_nodes_admitted gauge",
            f"imago_nodes_admitted {nodes_admitted}",
            "# HELP imago_nodes_healthy Admitted nodes in rotation.",
            "# TYPE imago_nodes_healthy gauge",
            f"imago_nodes_healthy {nodes_healthy}",
            "# HELP imago_relay_bytes_total Ciphertext bytes relayed.",
            "# TYPE imago_relay_bytes_total counter",
        ]
        for direction in ("request", "response"):
            out.append(
                f'imago_relay_bytes_total{{direction="{direction}"}} '
                f"{self.bytes_relayed[direction]}"
            )
        out += [
            "# HELP imago_node_attempts_total Relay attempts to nodes, by outcome.",
            "# TYPE imago_node_attempts_total counter",
        ]
        for outcome, n in sorted(self.attempts.items()):
            out.append(f'imago_node_attempts_total{{outcome="{outcome}"}} {n}')
        out += [
            "# HELP imago_relay_seconds Relay duration, request to last byte.",
            "# TYPE imago_relay_seconds histogram",
            *self.relay_seconds.render("imago_relay_seconds"),
            "# HELP imago_relay_first_byte_seconds Time to the node's first byte.",
            "# TYPE imago_relay_first_byte_seconds histogram",
            *self.first_byte_seconds.render("imago_relay_first_byte_seconds"),
            "# HELP imago_job_record_seconds Time to commit a job's in-flight row.",
            "# TYPE imago_job_record_seconds histogram",
            *self.record_seconds.render("imago_job_record_seconds"),
        ]
        return "\n".join(out) + "\n"
