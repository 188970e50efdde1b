"""Prometheus metrics of every offloaded model in the process (``pip install tensorstream[metrics]``).

    import tensorstream.metrics
    tensorstream.metrics.start_metrics_server(9400)          # http://host:9400/metrics
    # or: tensorstream.metrics.register(registry)          # into your own prometheus_client registry

A collector reads ``get_model_statistics`` of each model alive in the process at every scrape (nothing runs between
scrapes; a scrape costs one statistics snapshot per model) and labels every sample with ``model`` (the store's model
id). The names, units and meanings are listed in docs/metrics.md; :data:`METRICS` is the same list in code.

Counters stay monotonic across ``get_model_statistics(model, reset=True)``: a reset keeps what it zeroes in the
model's state, and the collector adds it back.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .errors import ConfigError

__all__ = ["METRICS", "TensorStreamCollector", "register", "start_metrics_server"]

# (name, type, statistics key, help). Counters come from the engine's counters, gauges from its current state.
METRICS: List[Tuple[str, str, str, str]] = [
    ("tensorstream_read_bytes_total", "counter", "bytes_read", "Bytes read from storage (as stored: compressed "
     "chunks count their stored size)"),
    ("tensorstream_delivered_bytes_total", "counter", "bytes_delivered", "Decoded bytes placed into slots"),
    ("tensorstream_acquires_total", "counter", "acquires", "Blocks requested by forward passes"),
    ("tensorstream_cache_hits_total", "counter", "hits", "Acquires that found their block resident"),
    ("tensorstream_cache_misses_total", "counter", "misses", "Acquires that had to wait for a load"),
    ("tensorstream_prefetches_issued_total", "counter", "prefetches_issued", "Loads started ahead of use"),
    ("tensorstream_prefetch_hits_total", "counter", "prefetch_hits", "Acquires served by a prefetch"),
    ("tensorstream_evictions_total", "counter", "evictions", "Blocks evicted to make room"),
    ("tensorstream_checksum_failures_total", "counter", "checksum_failures", "Chunks whose checksum did not match"),
    ("tensorstream_io_errors_total", "counter", "io_errors", "Reads that failed"),
    ("tensorstream_resident_bytes", "gauge", "vram_usage_bytes", "Weight bytes held on the execution device now "
     "(streamed blocks resident or in flight, plus never-streamed parameters)"),
    ("tensorstream_budget_bytes", "gauge", "budget_bytes", "The engine's budget for streamed blocks"),
    ("tensorstream_streamed_bytes", "gauge", "streamed_bytes", "Bytes of the model's streamed parameters"),
    ("tensorstream_in_flight_bytes", "gauge", "in_flight_bytes", "Bytes of blocks being loaded now"),
    ("tensorstream_host_tier_bytes", "gauge", "host_tier_held_bytes", "Bytes the pinned host tier holds (GPU)"),
    ("tensorstream_stall_seconds", "histogram", "wait_latency", "Waits of forward passes for a block that was "
     "not ready (one observation per wait that blocked)"),
    ("tensorstream_block_load_seconds", "histogram", "load_latency", "Loads of a block from storage, read start to "
     "ready"),
]


class TensorStreamCollector:
    """A prometheus_client collector over every offloaded model alive in the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def describe(self) -> Iterator[Any]:
        return iter(())  # no fixed samples: the models come and go (prometheus_client then calls collect lazily)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        from .torch.offload import live_states, state_statistics

        families: Dict[str, Any] = {}
        for name, kind, _key, text in METRICS:
            base = name[:-len("_total")] if kind == "counter" else name
            if kind == "counter":
                families[name] = CounterMetricFamily(base, text, labels=["model"])
            elif kind == "gauge":
                families[name] = GaugeMetricFamily(base, text, labels=["model"])
            else:
                families[name] = HistogramMetricFamily(base, text, labels=["model"])
        info = GaugeMetricFamily("tensorstream_model_info", "An offloaded model (value 1) and how it streams",
                                 labels=["model", "backend", "device", "storage_path"])
        with self._lock:
            seen: Dict[str, int] = {}
            for state in sorted(live_states(), key=lambda s: str(s.model_id)):
                try:
                    stats = state_statistics(state)
                except Exception:  # noqa: BLE001 - a model closing under the scrape is left out of this one
                    continue
                before = dict(state.counts_before_reset)
                label = str(stats["model_id"])
                seen[label] = seen.get(label, 0) + 1
                if seen[label] > 1:  # the same store model offloaded twice in one process
                    label = f"{label}#{seen[label]}"
                info.add_metric([label, str(stats["backend"]), str(stats["device"]), str(stats["storage_path"])], 1)
                for name, kind, key, _text in METRICS:
                    if kind == "counter":
                        families[name].add_metric([label], before.get(key, 0) + float(stats[key]))
                    elif kind == "gauge":
                        families[name].add_metric([label], float(stats[key] or 0))
                    else:
                        families[name].add_metric([label], *_histogram(before, key, stats[key]))
        yield info
        yield from families.values()


def _histogram(before: Dict[str, float], key: str, raw: Dict[str, Any]) -> Tuple[List[Tuple[str, float]], float]:
    """Cumulative (le, count) buckets and the sum, with what resets zeroed added back."""
    bounds = [repr(float(b)) for b in raw["bounds_s"]] + ["+Inf"]
    counts = list(raw["counts"]) + [0] * (len(bounds) - len(raw["counts"]))
    buckets: List[Tuple[str, float]] = []
    cumulative = 0.0
    for i, le in enumerate(bounds):
        cumulative += before.get(f"{key}[{i}]", 0) + float(counts[i])
        buckets.append((le, cumulative))
    return buckets, before.get(f"{key}.sum_s", 0.0) + float(raw["sum_s"])


_COLLECTOR: Optional[TensorStreamCollector] = None
_COLLECTOR_LOCK = threading.Lock()


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as error:
        raise ConfigError("tensorstream.metrics needs prometheus-client: pip install tensorstream[metrics] (or "
                          f"prometheus-client) ({error})", field="metrics") from None
    return prometheus_client


def register(registry: Any = None) -> TensorStreamCollector:
    """Registers the collector (once per registry) into ``registry`` (default: prometheus_client's global REGISTRY)
    and returns it."""
    global _COLLECTOR
    prometheus_client = _prometheus()
    registry = prometheus_client.REGISTRY if registry is None else registry
    with _COLLECTOR_LOCK:
        if _COLLECTOR is None:
            _COLLECTOR = TensorStreamCollector()
        collector = _COLLECTOR
        registered = getattr(registry, "_tensorstream_registered", False)
        if not registered:
            registry.register(collector)
            registry._tensorstream_registered = True
    return collector


def start_metrics_server(port: int, addr: str = "0.0.0.0", registry: Any = None) -> Any:
    """Serves ``/metrics`` (Prometheus text format) on ``addr:port`` from a daemon thread, with the collector
    registered into ``registry`` (default: the global one). Returns what prometheus_client.start_http_server returns
    (the server and its thread on recent versions)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be an int in 0..65535, got {port!r}", field="port")
    prometheus_client = _prometheus()
    registry = prometheus_client.REGISTRY if registry is None else registry
    register(registry)
    return prometheus_client.start_http_server(port, addr=addr, registry=registry)
