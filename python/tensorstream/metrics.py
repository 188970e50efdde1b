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

__all__ = ["METRICS", "SERVING_METRICS", "TensorStreamCollector", "ServingMetrics", "RequestMetrics", "register",
           "start_metrics_server"]

# (name, type, statistics key, help). Counters come from the engine's counters, gauges from its current state.
METRICS: List[Tuple[str, str, str, str]] = [
    ("tensorstream_read_bytes_total", "counter", "bytes_read", "Bytes read from storage (as stored: compressed "
     "chunks count their stored size)"),
    ("tensorstream_delivered_bytes_total", "counter", "bytes_delivered", "Decoded bytes placed into slots"),
    ("tensorstream_acquires_total", "counter", "acquires", "Blocks requested by forward passes"),
    ("tensorstream_cache_hits_total", "counter", "hits", "Acquires that found their block resident"),
    ("tensorstream_cache_reuses_total", "counter", "reuses",
     "Acquires served from memory with no storage read for them (kept since an earlier use)"),
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


# ---- serving -------------------------------------------------------------------------------------------------------

# Buckets of the serving histograms: latencies from 10 ms to 2 minutes; batch sizes up to 256.
_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

SERVING_METRICS: List[Tuple[str, str, str]] = [
    ("tensorstream_requests_running", "gauge", "Requests in the running batch"),
    ("tensorstream_requests_waiting", "gauge", "Requests admitted and waiting for a place in the batch"),
    ("tensorstream_requests_total", "counter", "Finished requests, by outcome (stop, length, error, cancelled)"),
    ("tensorstream_prompt_tokens_total", "counter", "Prompt tokens of the requests started"),
    ("tensorstream_generation_tokens_total", "counter", "Tokens generated"),
    ("tensorstream_time_to_first_token_seconds", "histogram", "From a request's arrival to its first token"),
    ("tensorstream_inter_token_latency_seconds", "histogram", "Between consecutive tokens of one request"),
    ("tensorstream_request_latency_seconds", "histogram", "From a request's arrival to its end"),
    ("tensorstream_batch_size", "histogram", "Requests in each decoding step"),
]


class ServingMetrics:
    """The serving side's metrics for one served model (label ``model``), registered into ``registry`` (default:
    prometheus_client's global REGISTRY). The server calls :meth:`request` when a request arrives and drives the
    returned :class:`RequestMetrics`; :meth:`step` once per decoding step with the batch size.

    Thread-safety: every method may be called from any thread (prometheus_client's metrics are thread-safe).
    """

    def __init__(self, model: str, registry: Any = None) -> None:
        prometheus_client = _prometheus()
        registry = prometheus_client.REGISTRY if registry is None else registry
        self.model = model
        families = getattr(registry, "_tensorstream_serving", None)
        if families is None:  # one set of families per registry; each served model is a label value
            families = {
                "running": prometheus_client.Gauge("tensorstream_requests_running", SERVING_METRICS[0][2],
                                                   ["model"], registry=registry),
                "waiting": prometheus_client.Gauge("tensorstream_requests_waiting", SERVING_METRICS[1][2],
                                                   ["model"], registry=registry),
                "requests": prometheus_client.Counter("tensorstream_requests", SERVING_METRICS[2][2],
                                                      ["model", "outcome"], registry=registry),
                "prompt": prometheus_client.Counter("tensorstream_prompt_tokens", SERVING_METRICS[3][2], ["model"],
                                                    registry=registry),
                "generated": prometheus_client.Counter("tensorstream_generation_tokens", SERVING_METRICS[4][2],
                                                       ["model"], registry=registry),
                "ttft": prometheus_client.Histogram("tensorstream_time_to_first_token_seconds", SERVING_METRICS[5][2],
                                                    ["model"], buckets=_LATENCY_BUCKETS_S, registry=registry),
                "itl": prometheus_client.Histogram("tensorstream_inter_token_latency_seconds", SERVING_METRICS[6][2],
                                                   ["model"], buckets=_LATENCY_BUCKETS_S, registry=registry),
                "e2e": prometheus_client.Histogram("tensorstream_request_latency_seconds", SERVING_METRICS[7][2],
                                                   ["model"], buckets=_LATENCY_BUCKETS_S, registry=registry),
                "batch": prometheus_client.Histogram("tensorstream_batch_size", SERVING_METRICS[8][2], ["model"],
                                                     buckets=_BATCH_BUCKETS, registry=registry),
            }
            registry._tensorstream_serving = families
        self._families = families

    def request(self, prompt_tokens: int) -> "RequestMetrics":
        """A request arrived (it waits until :meth:`RequestMetrics.started`)."""
        return RequestMetrics(self, prompt_tokens)

    def step(self, batch_size: int) -> None:
        """One decoding step ran for ``batch_size`` requests."""
        self._families["batch"].labels(self.model).observe(batch_size)


class RequestMetrics:
    """One request's life: waiting, running, its tokens, its end (exactly once)."""

    def __init__(self, serving: ServingMetrics, prompt_tokens: int) -> None:
        import time

        self._clock = time.monotonic
        self._f = serving._families
        self._model = serving.model
        self._arrived = self._clock()
        self._last_token: Optional[float] = None
        self._state = "waiting"
        self._prompt_tokens = int(prompt_tokens)
        self._f["waiting"].labels(self._model).inc()

    def started(self) -> None:
        """The request entered the running batch."""
        if self._state != "waiting":
            return
        self._state = "running"
        self._f["waiting"].labels(self._model).dec()
        self._f["running"].labels(self._model).inc()
        self._f["prompt"].labels(self._model).inc(self._prompt_tokens)

    def token(self, count: int = 1) -> None:
        """``count`` tokens were generated for this request."""
        now = self._clock()
        if self._last_token is None:
            self._f["ttft"].labels(self._model).observe(now - self._arrived)
        else:
            self._f["itl"].labels(self._model).observe(now - self._last_token)
        self._last_token = now
        self._f["generated"].labels(self._model).inc(count)

    def finished(self, outcome: str) -> None:
        """The request ended: "stop", "length", "error" or "cancelled" (a client that went away)."""
        if self._state == "finished":
            return
        gauge = "waiting" if self._state == "waiting" else "running"
        self._f[gauge].labels(self._model).dec()
        self._state = "finished"
        self._f["requests"].labels(self._model, outcome).inc()
        self._f["e2e"].labels(self._model).observe(self._clock() - self._arrived)
