"""tensorstream.metrics: the Prometheus collector over every offloaded model in the process. Scraped values equal
get_model_statistics; histograms count every load and every blocking wait; counters stay monotonic across a
statistics reset; a model that is cleaned up leaves the scrape; /metrics over HTTP; typed errors."""

from __future__ import annotations

import re
import urllib.request

import pytest

torch = pytest.importorskip("torch")
prometheus_client = pytest.importorskip("prometheus_client")

import tensorstream as ts  # noqa: E402
import tensorstream.metrics as metrics  # noqa: E402
from store_faults import state_of  # noqa: E402


def scrape(registry) -> dict:
    """{(sample name, frozenset of labels): value} of the registry's current exposition."""
    out = {}
    for family in registry.collect():
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples, name, model, **labels):
    return samples[(name, frozenset({"model": model, **labels}.items()))]


@pytest.fixture
def registry():
    reg = prometheus_client.CollectorRegistry()
    metrics.register(reg)
    return reg


def test_scraped_values_equal_the_statistics(ts_models, tmp_path, registry):
    _plain, model = ts_models.offload("llama", tmp_path / "store", budget=0.3)
    with torch.no_grad():
        for _ in range(3):
            model(ts_models.input_ids())
    stats = ts.get_model_statistics(model)
    samples = scrape(registry)
    model_id = state_of(model).model_id
    for name, kind, key, _help in metrics.METRICS:
        if kind == "histogram":
            continue
        assert value(samples, name, model_id) == pytest.approx(float(stats[key])), name
    loads = sum(b["loads"] for b in stats["blocks"].values() if not b.get("read_by_rows"))
    assert loads > 0
    assert value(samples, "tensorstream_block_load_seconds_count", model_id) == loads
    assert value(samples, "tensorstream_block_load_seconds_bucket", model_id, le="+Inf") == loads
    assert value(samples, "tensorstream_block_load_seconds_sum", model_id) == pytest.approx(
        sum(b["load_s"] for b in stats["blocks"].values() if not b.get("read_by_rows")), rel=1e-6)
    buckets = sorted(((float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
                      if name == "tensorstream_block_load_seconds_bucket"), key=lambda x: x[0])
    assert [v for _le, v in buckets] == sorted(v for _le, v in buckets), "cumulative buckets never decrease"
    assert value(samples, "tensorstream_stall_seconds_sum", model_id) == pytest.approx(stats["stall_time_s"],
                                                                                      rel=1e-6)
    info = [labels for (name, labels), v in samples.items() if name == "tensorstream_model_info"]
    assert dict(info[0])["model"] == model_id and dict(info[0])["backend"] == stats["backend"]


def test_counters_stay_monotonic_across_a_statistics_reset(ts_models, tmp_path, registry):
    _plain, model = ts_models.offload("llama", tmp_path / "store", budget=0.3)
    model_id = state_of(model).model_id
    with torch.no_grad():
        model(ts_models.input_ids())
    before = scrape(registry)
    read_before = value(before, "tensorstream_read_bytes_total", model_id)
    loads_before = value(before, "tensorstream_block_load_seconds_count", model_id)
    ts.get_model_statistics(model, reset=True)  # the engine's counters go back to zero
    with torch.no_grad():
        model(ts_models.input_ids())
    after = scrape(registry)
    read_now = ts.get_model_statistics(model)["bytes_read"]
    assert read_now > 0
    assert value(after, "tensorstream_read_bytes_total", model_id) == read_before + read_now
    assert value(after, "tensorstream_block_load_seconds_count", model_id) > loads_before


def test_models_come_and_go(ts_models, tmp_path, registry):
    _plain, first = ts_models.offload("llama", tmp_path / "a", budget=0.5)
    _plain, second = ts_models.offload("gpt2", tmp_path / "b", budget=0.5)
    first_id, second_id = state_of(first).model_id, state_of(second).model_id

    def models():
        return {dict(labels)["model"] for (name, labels), _v in scrape(registry).items()
                if name == "tensorstream_budget_bytes"}

    assert {first_id, second_id} <= models()
    first.cleanup_tensorstream()
    assert second_id in models() and first_id not in models()


def test_metrics_over_http(ts_models, tmp_path, registry):
    _plain, model = ts_models.offload("llama", tmp_path / "store", budget=0.5)
    with torch.no_grad():
        model(ts_models.input_ids())
    server, thread = metrics.start_metrics_server(0, addr="127.0.0.1", registry=registry)
    try:
        port = server.server_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
        thread.join(timeout=10)
    model_id = state_of(model).model_id
    assert re.search(rf'^tensorstream_read_bytes_total{{model="{model_id}"}} [1-9]', text, re.MULTILINE), text[:2000]
    assert "# TYPE tensorstream_block_load_seconds histogram" in text


def test_errors_are_typed(monkeypatch):
    with pytest.raises(ts.ConfigError) as caught:
        metrics.start_metrics_server(70000)
    assert caught.value.field == "port"
    import sys

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if it were not installed
    with pytest.raises(ts.ConfigError, match=r"pip install tensorstream\[metrics\]"):
        metrics.register(object())


# ---- serving -----------------------------------------------------------------------------------------------------

def test_serving_metrics_follow_each_request(registry):
    serving = metrics.ServingMetrics("tiny", registry)
    first = serving.request(prompt_tokens=7)
    second = serving.request(prompt_tokens=3)
    samples = scrape(registry)
    assert value(samples, "tensorstream_requests_waiting", "tiny") == 2
    first.started()
    second.started()
    serving.step(2)
    for _ in range(4):
        first.token()
    second.token(2)
    second.finished("cancelled")  # a client that went away
    first.finished("stop")
    first.finished("stop")  # once only
    samples = scrape(registry)
    assert value(samples, "tensorstream_requests_running", "tiny") == 0
    assert value(samples, "tensorstream_requests_waiting", "tiny") == 0
    assert value(samples, "tensorstream_prompt_tokens_total", "tiny") == 10
    assert value(samples, "tensorstream_generation_tokens_total", "tiny") == 6
    assert value(samples, "tensorstream_requests_total", "tiny", outcome="stop") == 1
    assert value(samples, "tensorstream_requests_total", "tiny", outcome="cancelled") == 1
    assert value(samples, "tensorstream_time_to_first_token_seconds_count", "tiny") == 2
    assert value(samples, "tensorstream_inter_token_latency_seconds_count", "tiny") == 3  # 4 tokens, 3 gaps
    assert value(samples, "tensorstream_request_latency_seconds_count", "tiny") == 2
    assert value(samples, "tensorstream_batch_size_count", "tiny") == 1
    assert value(samples, "tensorstream_batch_size_sum", "tiny") == 2
    # A second served model shares the families under its own label.
    other = metrics.ServingMetrics("other", registry)
    other.request(prompt_tokens=1).finished("error")
    samples = scrape(registry)
    assert value(samples, "tensorstream_requests_total", "other", outcome="error") == 1
    assert value(samples, "tensorstream_requests_waiting", "other") == 0
