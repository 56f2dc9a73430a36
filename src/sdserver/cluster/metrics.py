"""/metrics on Ray Serve: every member's metrics in one exposition, each sample labelled `replica`.

Each engine replica and ingress sends its own Prometheus text with its heartbeat (every second); the
ingress that is scraped renders its own live and the others' latest. Prometheus then sums across
replicas (`sum without (replica) (...)`). Cluster-wide gauges come on top: replicas up and down, jobs
queued and running on the board.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .state import Cluster


class ClusterCollector(Collector):
    def __init__(self, cluster: Cluster, own: CollectorRegistry, own_id: Callable[[], str]) -> None:
        self.cluster, self.own, self.own_id = cluster, own, own_id

    def collect(self) -> Iterable[Metric]:
        snapshot = self.cluster.snapshot
        texts = {self.own_id(): generate_latest(self.own)}
        for member in snapshot.members:
            if member.id not in texts and member.metrics and snapshot.up(member):
                texts[member.id] = member.metrics
        yield from merge(texts)
        replicas = GaugeMetricFamily("sdserver_cluster_replicas", "Engine replicas by state", labels=["state"])
        up = len(snapshot.engines_up)
        replicas.add_metric(["up"], up)
        replicas.add_metric(["down"], len(snapshot.engines) - up)
        yield replicas
        jobs = GaugeMetricFamily("sdserver_cluster_jobs", "Jobs on the board by status", labels=["status"])
        for status, count in sorted(snapshot.jobs.items()):
            jobs.add_metric([status], count)
        yield jobs


def merge(texts: dict[str, bytes]) -> list[Metric]:
    """Families of the same name from several members become one, their samples labelled by member."""
    families: dict[str, Metric] = {}
    for member, text in texts.items():
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labels = {**sample.labels, "replica": member}
                merged.add_sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
    return list(families.values())


def cluster_registry(cluster: Cluster, own: CollectorRegistry, own_id: Callable[[], str]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(cluster, own, own_id))
    return registry
