"""Prometheus metrics of the server, in the text exposition format (no client library needed).

Counters and histograms are plain dicts updated on the event loop's thread only (the generation
threads hand their results back to the loop), so nothing here needs a lock.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_Labels = TypeVar("_Labels", bound=tuple[str, ...])  # a counter's label values, one per label name


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: dict[tuple[str, ...], list[int]] = field(default_factory=dict)
    sums: dict[tuple[str, ...], float] = field(default_factory=lambda: defaultdict(float))

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts = self.counts.setdefault(labels, [0] * (len(self.buckets) + 1))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        counts[-1] += 1
        self.sums[labels] += value


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)  # (path, model, status)
        self.tokens: dict[tuple[str, str], int] = defaultdict(int)  # (model, prompt|completion)
        self.latency = Histogram(LATENCY_BUCKETS)  # (model,)
        self.ttft = Histogram(TTFT_BUCKETS)  # (model,)
        self.queued: dict[str, int] = defaultdict(int)  # waiting for the model's generation slot
        self.running: dict[str, int] = defaultdict(int)
        self.disconnects: dict[str, int] = defaultdict(int)
        self.connections = 0  # open now
        self.rejected: dict[str, int] = defaultdict(int)  # by reason: connections.ConnectionGuard
        self.models: dict[str, tuple[str, str]] = {}  # model -> (format, device): set by the server

    def render(self) -> str:
        out: list[str] = []
        self._counter(out, "appliance_requests_total", "HTTP requests by path, model and status",
                      ("path", "model", "status"), self.requests)
        self._counter(out, "appliance_tokens_total", "tokens read (prompt) and generated (completion)",
                      ("model", "kind"), self.tokens)
        self._counter(out, "appliance_client_disconnects_total",
                      "generations stopped because the client went away", ("model",),
                      {(k,): v for k, v in self.disconnects.items()})
        self._counter(out, "appliance_connections_rejected_total",
                      "connections and requests refused or closed by the server's limits, by reason",
                      ("reason",), {(k,): v for k, v in self.rejected.items()})
        out += ["# HELP appliance_model_info the models served, their format and where they compute",
                "# TYPE appliance_model_info gauge"]
        out += [f"appliance_model_info{_labels(('model', 'format', 'device'), (m, *fd))} 1"
                for m, fd in sorted(self.models.items())]
        out += ["# HELP appliance_connections_open client connections open now",
                "# TYPE appliance_connections_open gauge", f"appliance_connections_open {self.connections}"]
        self._gauge(out, "appliance_queue_depth", "requests waiting for a generation slot", self.queued)
        self._gauge(out, "appliance_requests_running", "generations in progress", self.running)
        self._histogram(out, "appliance_request_seconds", "chat completion latency, end to end",
                        self.latency)
        self._histogram(out, "appliance_time_to_first_token_seconds",
                        "from request to the first generated token", self.ttft)
        return "\n".join(out) + "\n"

    @staticmethod
    def _counter(out: list[str], name: str, help_: str, names: tuple[str, ...],
                 values: Mapping[_Labels, int]) -> None:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
        out += [f"{name}{_labels(names, k)} {v}" for k, v in sorted(values.items())]

    @staticmethod
    def _gauge(out: list[str], name: str, help_: str, values: dict[str, int]) -> None:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
        out += [f"{name}{_labels(('model',), (k,))} {v}" for k, v in sorted(values.items())]

    @staticmethod
    def _histogram(out: list[str], name: str, help_: str, hist: Histogram) -> None:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        for labels, counts in sorted(hist.counts.items()):
            for bound, count in zip((*hist.buckets, "+Inf"), counts, strict=True):
                le = f'le="{bound}"'
                out.append(f"{name}_bucket{_labels(('model',), labels, le)} {count}")
            out.append(f"{name}_sum{_labels(('model',), labels)} {hist.sums[labels]:.6f}")
            out.append(f"{name}_count{_labels(('model',), labels)} {counts[-1]}")
