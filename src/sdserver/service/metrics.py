"""Prometheus metrics, one registry per app (so several apps in one process do not collide)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

GaugeReader = Callable[[], dict[str, float]]


class _CallbackGauges(Collector):
    """Gauges read at scrape time (queue depth, loaded models, device memory)."""

    def __init__(self) -> None:
        self.readers: list[tuple[str, str, GaugeReader]] = []

    def collect(self) -> Iterable[Metric]:
        for name, documentation, read in self.readers:
            family = GaugeMetricFamily(name, documentation, labels=["kind"])
            for kind, value in read().items():
                family.add_metric([kind], value)
            yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open fds
        self.requests = Counter(
            "sdserver_http_requests",
            "HTTP requests by route and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.batch_images = Histogram(
            "sdserver_batch_images",
            "Images per batch: per pipeline call (request batching), or in the running set as each request "
            "joins it (step batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "sdserver_denoising_step_seconds",
            "Wall time of one denoising step (whole batch)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.joins_per_step = Histogram(
            "sdserver_running_set_joins",
            "Requests that joined the running set before one denoising step (step batching)",
            buckets=(0, 1, 2, 4, 8, 16),
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "sdserver_queue_wait_seconds",
            "Time from submit to start",
            registry=self.registry,
        )
        self.images = Counter("sdserver_images_generated", "Images generated", ["model"], registry=self.registry)
        self.jobs = Counter("sdserver_jobs_finished", "Jobs by outcome", ["status"], registry=self.registry)
        self._gauges = _CallbackGauges()
        self.registry.register(self._gauges)

    def add_gauges(self, name: str, documentation: str, read: GaugeReader) -> None:
        self._gauges.readers.append((name, documentation, read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
