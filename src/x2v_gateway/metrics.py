"""Prometheus metrics, one registry per app (so tests can build several apps in one process)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# Seconds of writing `/metrics` between two turns of the event loop.
SLICE = 0.002
# The types the Prometheus text format knows, for the OpenMetrics types it does not.
_TEXT_TYPES = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram", "unknown": "untyped"}
# Samples the text format shows as gauges of their own, after their family (`_created`: when a
# counter or histogram was made).
_OWN_GAUGES = ("_created", "_gsum", "_gcount")


class _JobStates(Collector):
    """Jobs by state, read from the store at scrape time (the store is the truth).

    Prometheus collects synchronously, and the store is read off the event loop: the scrape's
    handler reads the counts first and hands them to `Metrics.render`."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def collect(self):
        family = GaugeMetricFamily("x2v_jobs", "Jobs in the store by state", labels=["state"])
        counts = self.counts
        for state, n in counts.items():
            family.add_metric([state], n)
        yield family
        yield GaugeMetricFamily(
            "x2v_queue_depth", "Jobs waiting in the gateway's queue", value=counts.get("queued", 0)
        )


def _families(collector: Collector) -> Iterator[tuple[Metric, Iterable[tuple[str, dict[str, str], float]]]]:
    """Each family of `collector`, with its samples (name, labels, value) as they are read. A
    metric with labels is read a series at a time (`collect()` would read every series first:
    with 1,000 nodes, 5,000 latency histograms at once)."""
    if isinstance(collector, MetricWrapperBase):
        (family,) = collector.describe()
        name = family.name
        yield family, ((name + sample.name, sample.labels, sample.value) for sample in collector._samples())
        return
    for family in collector.collect():
        yield family, ((sample.name, sample.labels, sample.value) for sample in family.samples)


def _header(name: str, documentation: str, kind: str) -> str:
    documentation = documentation.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {documentation}\n# TYPE {name} {kind}\n"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _line(name: str, labels: dict[str, str], value: float) -> str:
    if not labels:
        return f"{name} {floatToGoString(value)}\n"
    pairs = ",".join(f'{key}="{_escape(text)}"' for key, text in sorted(labels.items()))
    return f"{name}{{{pairs}}} {floatToGoString(value)}\n"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._job_states = _JobStates()
        self.registry.register(self._job_states)
        self.upstream_latency = Histogram(
            "x2v_upstream_request_seconds", "Upstream request latency",
            ["upstream", "operation"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
        )
        self.upstream_errors = Counter(
            "x2v_upstream_errors", "Upstream requests that failed",
            ["upstream", "operation", "kind"], registry=self.registry,
        )
        self.upstream_up = Gauge(
            "x2v_upstream_up", "1 when the upstream answers its status endpoint",
            ["upstream"], registry=self.registry,
        )
        self.submissions = Counter(
            "x2v_submissions", "Jobs sent to an upstream", ["upstream"], registry=self.registry
        )
        self.webhook_attempts = Counter(
            "x2v_webhook_attempts", "Webhook delivery attempts, by outcome: delivered, failed (to be"
            " retried), given_up", ["outcome"], registry=self.registry,
        )
        self.jobs_finished = Counter(
            "x2v_jobs_finished", "Jobs that reached a final state", ["state"], registry=self.registry
        )
        self.node_busy = Gauge(
            "x2v_node_busy", "1 while the node runs a task", ["upstream"], registry=self.registry
        )
        self.node_queue_depth = Gauge(
            "x2v_node_queue_depth", "Jobs waiting in the node's own queue (sent, not started)",
            ["upstream"], registry=self.registry,
        )
        self.node_slots = Gauge(
            "x2v_node_slots", "Jobs the gateway keeps in flight on the node (capacity + look-ahead;"
            " 0 while drained)", ["upstream"], registry=self.registry,
        )
        self.jobs_moved = Counter(
            "x2v_jobs_moved", "Jobs taken back from a node and queued again",
            ["upstream", "reason"], registry=self.registry,
        )
        self.jobs_taken_over = Counter(
            "x2v_jobs_taken_over", "Jobs in flight this replica took over from a replica that stopped",
            registry=self.registry,
        )
        self.dispatch_lag = Histogram(
            "x2v_dispatch_lag_seconds",
            "From a node slot seen free (its job finished or left) to the next job sent there,"
            " when a job was waiting", ["upstream"], registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
        )
        self.dispatch_round = Histogram(
            "x2v_dispatch_round_seconds", "Time to choose which queued jobs go to which nodes",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
        )

    def add_upstream(self, name: str, operations: tuple[str, ...]) -> None:
        """A node's series, made when the node is added: shown as 0 until used, and made while
        the gateway starts, so that `app.settle_heap` takes them out of the cycle collector's
        view (with 1,000 nodes, about 80,000 objects of the histograms alone). `operations`: the
        upstream calls every node gets."""
        for operation in operations:
            self.upstream_latency.labels(name, operation)
        self.dispatch_lag.labels(name)
        self.submissions.labels(name)
        for gauge in (self.upstream_up, self.node_busy, self.node_queue_depth, self.node_slots):
            gauge.labels(name)

    def forget_upstream(self, name: str) -> None:
        """A removed node's series go away with it: all of them, also those of rarer calls (a
        cancel, a resume), of its errors by kind and of the jobs moved off it by reason."""
        for metric in (
            self.upstream_latency, self.upstream_errors, self.jobs_moved, self.upstream_up, self.node_busy,
            self.node_queue_depth, self.node_slots, self.submissions, self.dispatch_lag,
        ):
            # A metric's series by their label values: prometheus_client keeps them in `_metrics`
            # and lists them nowhere public (`render` reads them through `_samples()` too).
            at = metric._labelnames.index("upstream")
            for labels in [labels for labels in list(metric._metrics) if labels[at] == name]:
                metric.remove(*labels)

    async def render(self, job_counts: dict[str, int]) -> bytes:
        """The registry as Prometheus text, with `job_counts` (`store.counts_by_state()`): what
        `prometheus_client.generate_latest` writes, byte for byte, written on the event loop
        `SLICE` seconds at a time.

        With 1,000 nodes the text is 89,000 lines and 0.7-0.9 s of CPU. Written in one go on the
        loop, it held every request and every node's follow loop that long. Written on a thread,
        it held them 0.4-0.5 s all the same: the loop takes the interpreter back for each of its
        many callbacks (a node's answer, a timer), and each time waits up to the interpreter's
        switch interval (5 ms) while the writing thread holds it.
        """
        self._job_states.counts = job_counts
        out: list[str] = []
        until = time.perf_counter() + SLICE
        for collector in list(self.registry._collector_to_names):
            for family, samples in _families(collector):
                name, kind = family.name, _TEXT_TYPES.get(family.type, family.type)
                out.append(_header(name + "_total" if kind == "counter" else name, family.documentation, kind))
                apart: dict[str, list[str]] = {}
                for i, (sample_name, labels, value) in enumerate(samples):
                    suffix = sample_name[len(name):] if sample_name.startswith(name) else ""
                    line = _line(sample_name, labels, value)
                    (apart.setdefault(suffix, []) if suffix in _OWN_GAUGES else out).append(line)
                    if not i & 63 and time.perf_counter() > until:
                        await asyncio.sleep(0)
                        until = time.perf_counter() + SLICE
                for suffix, lines in sorted(apart.items()):
                    out.append(_header(name + suffix, family.documentation, "gauge"))
                    out.extend(lines)
        return "".join(out).encode()
