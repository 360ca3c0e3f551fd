"""``GET /metrics``: Prometheus text from ``prometheus_client``.

Per clone (label ``name``) the values are read from the clones at scrape time by a
custom collector, so nothing is counted twice and a removed clone's series go
with it. The API's own latency is a histogram updated by the API middleware.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from liveclone.daemon.manager import Manager


class ClonesCollector(Collector):
    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        m = self.manager
        labels = ["name"]
        size = GaugeMetricFamily("liveclone_clone_size_bytes", "Virtual size of the clone",
                                 labels=labels)
        present = GaugeMetricFamily("liveclone_clone_present_bytes",
                                    "Bytes of the clone already present (copied or written)",
                                    labels=labels)
        copied = CounterMetricFamily("liveclone_clone_copied_bytes",
                                     "Bytes the copier and fills wrote into the clone from the "
                                     "source (this run of the daemon)", labels=labels)
        from_source = CounterMetricFamily("liveclone_clone_source_read_bytes",
                                          "Bytes read from the source (this run)", labels=labels)
        reads = CounterMetricFamily("liveclone_clone_guest_reads", "Guest read requests",
                                    labels=labels)
        writes = CounterMetricFamily("liveclone_clone_guest_writes", "Guest write requests",
                                     labels=labels)
        read_bytes = CounterMetricFamily("liveclone_clone_guest_read_bytes",
                                         "Bytes guests read", labels=labels)
        written = CounterMetricFamily("liveclone_clone_guest_written_bytes",
                                      "Bytes guests wrote", labels=labels)
        rate = GaugeMetricFamily("liveclone_clone_copy_rate_bytes_per_second",
                                 "Copy rate over the last seconds", labels=labels)
        complete = GaugeMetricFamily("liveclone_clone_complete", "1 once every region is "
                                     "present", labels=labels)
        failed = GaugeMetricFamily("liveclone_clone_failed", "1 while the copy or the clone "
                                   "is failed", labels=labels)
        count = 0
        for c in list(m.clones.values()):
            s = c.session
            if s is None:
                continue
            count += 1
            clone, st, n = s.clone, s.clone.stats, [c.name]
            size.add_metric(n, clone.size)
            present.add_metric(n, min(clone.regions_present * clone.region_size, clone.size))
            copied.add_metric(n, st.bytes_copied)
            from_source.add_metric(n, st.bytes_from_source)
            reads.add_metric(n, st.guest_reads)
            writes.add_metric(n, st.guest_writes)
            read_bytes.add_metric(n, st.guest_bytes_read)
            written.add_metric(n, st.guest_bytes_written)
            rate.add_metric(n, s.copier.rate())
            complete.add_metric(n, 1 if clone.complete else 0)
            failed.add_metric(n, 1 if s.copier.phase == "failed" else 0)
        yield GaugeMetricFamily("liveclone_clones", "Clones served", value=count)
        yield from (size, present, copied, from_source, reads, writes, read_bytes, written,
                    rate, complete, failed)
        nbd = m.server.stats
        yield GaugeMetricFamily("liveclone_nbd_connections", "NBD connections open",
                                value=nbd.active)
        yield CounterMetricFamily("liveclone_nbd_requests", "NBD requests dispatched",
                                  value=nbd.requests)
        yield GaugeMetricFamily("liveclone_nbd_memory_bytes", "Memory held for NBD clients",
                                value=m.server.memory)
        yield GaugeMetricFamily("liveclone_event_subscribers", "Clients of /v1/events",
                                value=m.events.subscribers)
        if m.cache is not None:
            cs = m.cache.status()
            yield CounterMetricFamily("liveclone_cache_hits", "Source opens that found their "
                                      "source's cache entry", value=cs["hits"])
            yield CounterMetricFamily("liveclone_cache_misses", "Source opens that made a new "
                                      "cache entry", value=cs["misses"])
            yield CounterMetricFamily("liveclone_cache_uncached", "Source opens read uncached "
                                      "(the cache size bound could not be met)",
                                      value=cs["uncached"])
            yield CounterMetricFamily("liveclone_cache_fetched_bytes", "Bytes the cache "
                                      "fetched from remote sources", value=cs["bytes_fetched"])
            yield GaugeMetricFamily("liveclone_cache_used_bytes", "Bytes the cache holds",
                                    value=cs["bytes_used"])
            yield GaugeMetricFamily("liveclone_cache_entries", "Cache entries",
                                    value=len(cs["entries"]))


class Metrics:
    """The daemon's registry: the clones' collector and the API's latency."""

    def __init__(self, manager: Manager) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ClonesCollector(manager))
        self.api_latency = Histogram(
            "liveclone_api_request_duration_seconds", "Time to answer an API request",
            ["method", "route", "status"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
