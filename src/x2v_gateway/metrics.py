"""Prometheus metrics, one registry per app (so tests can build several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


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
        by_upstream = [
            (self.upstream_latency, ("upstream", "operation")),
            (self.upstream_errors, ("upstream", "operation", "kind")),
            (self.jobs_moved, ("upstream", "reason")),
            *((metric, ("upstream",)) for metric in (
                self.upstream_up, self.node_busy, self.node_queue_depth, self.node_slots,
                self.submissions, self.dispatch_lag,
            )),
        ]
        for metric, names in by_upstream:
            # The series are found by what the metric reports: prometheus_client lists them no other way.
            found = {tuple(sample.labels[label] for label in names)
                     for family in metric.collect() for sample in family.samples
                     if sample.labels.get("upstream") == name}
            for labels in found:
                metric.remove(*labels)

    def render(self, job_counts: dict[str, int]) -> bytes:
        """The registry as Prometheus text, with `job_counts` (`store.counts_by_state()`)."""
        self._job_states.counts = job_counts
        return generate_latest(self.registry)
