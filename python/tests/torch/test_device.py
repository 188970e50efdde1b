"""Offloaded models on a GPU placement, run on the engine's CPU double of the CUDA driver (no GPU needed): the
engine's CUDA path (pinned staging, copies on a copy stream, ready events the compute stream waits on, fences at
release) under real models, with outputs compared to the plain model bit for bit. The same tests run on a real GPU
in tools/gpu_check.sh (marker ``gpu``: there the placement is a real device)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

import tensorstream as ts  # noqa: E402
from tensorstream import _core  # noqa: E402
from tensorstream.torch.device import resolve_placement, use_cuda_double  # noqa: E402
from store_faults import state_of  # noqa: E402


@pytest.fixture
def double():
    """A fresh CPU double of the CUDA driver, active for the test."""
    cuda = _core.CudaDouble(copy_latency_us=200, jitter=True)
    with use_cuda_double(cuda):
        yield cuda


class Gpu:
    """The placement a test runs on: the double (always) or this machine's GPU (marker ``gpu``)."""

    def __init__(self, double=None):
        self.double = double
        self.device = torch.device("cpu") if double is not None else torch.device("cuda", 0)

    def reference(self, plain):
        """The plain model on the same device: outputs are compared bit for bit on one device only."""
        return plain if self.double is not None else copy.deepcopy(plain).to(self.device)


@pytest.fixture(params=[pytest.param("double", id="double"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
def gpu(request):
    if request.param == "double":
        cuda = _core.CudaDouble(copy_latency_us=200, jitter=True)
        with use_cuda_double(cuda):
            yield Gpu(cuda)
        return
    status = ts.cuda_available()
    if not status or not torch.cuda.is_available():
        pytest.skip(f"no GPU: {status.reason or 'this PyTorch has no CUDA'}")
    torch.cuda.synchronize()
    yield Gpu()


def _offload(ts_models, tmp_path, name="llama", budget=0.5, **config):
    plain = ts_models.plain(name)
    model = copy.deepcopy(plain)
    config.setdefault("vram_budget_gb", budget * ts_models.param_bytes(plain) / 1e9)
    ts_models.track(ts.offload(model, ts_models.make_config(tmp_path, **config)))
    return plain, model


@pytest.mark.parametrize("budget", [0.5, 2.0])
@pytest.mark.parametrize("compression", [False, True], ids=["raw", "compressed"])
def test_offload_to_cuda_matches_the_plain_model(ts_models, tmp_path, gpu, budget, compression):
    baseline = torch.cuda.memory_allocated() if gpu.double is None else 0
    plain, model = _offload(ts_models, tmp_path, budget=budget, device="cuda:0", compression_enabled=compression)
    ts_models.assert_matches_plain("llama", gpu.reference(plain), model, ts_models.input_ids().to(gpu.device))
    stats = ts.get_model_statistics(model)
    assert stats["device"].startswith("cuda:0")
    assert stats["slot_access"] == "device_by_copy" and stats["transfer"] == "cuda"
    assert stats["held_bytes"] <= stats["budget_bytes"]
    assert stats["h2d_bytes"] >= stats["bytes_delivered"] - stats["row_bytes_read"] > 0, "every slot byte was copied"
    assert stats["h2d_throughput_gbps"] > 0
    if gpu.double is not None:
        ops = gpu.double.operation_counts()
        assert ops.get("copy", 0) > 0, "weights reached the slots by device copies"
        assert ops.get("wait", 0) > 0, "the compute stream waited for ready events"
        assert gpu.double.pinned_bytes > 0, "staging is pinned memory"
        assert stats["device_stall_time_s"] > 0, "the compute stream's waits for copies are measured on it"
    else:
        held = torch.cuda.memory_allocated() - baseline
        assert held <= stats["arena_bytes"] + stats["resident_bytes"] + (8 << 20), "VRAM beyond arena + resident"
    model.cleanup_tensorstream()
    if gpu.double is None:  # the arena and staging are gone; the model holds its own weights on the device again
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        weights += sum(b.numel() * b.element_size() for b in model.buffers())
        assert torch.cuda.memory_allocated() - baseline <= weights + (8 << 20)
    if gpu.double is not None:
        assert gpu.double.pinned_bytes == 0 and gpu.double.live_events == 0 and gpu.double.live_streams == 0
    with torch.no_grad():
        ids = ts_models.input_ids().to(gpu.device)
        ts_models.assert_equal(ts_models.forward("llama", model, ids),
                               ts_models.forward("llama", gpu.reference(plain), ids), "after cleanup")


def test_the_guides_order_offload_then_to_cuda_and_back(ts_models, tmp_path, gpu):
    plain, model = _offload(ts_models, tmp_path, budget=0.5)
    ids = ts_models.input_ids()
    assert ts.get_model_statistics(model)["slot_access"] == "host"
    written = ts.get_model_statistics(model)["model_id"]
    assert model.to("cuda:0") is model
    stats = ts.get_model_statistics(model)
    assert stats["device"].startswith("cuda:0") and stats["slot_access"] == "device_by_copy"
    assert stats["model_id"] == written  # the store is not written again
    ts_models.assert_matches_plain("llama", gpu.reference(plain), model, ids.to(gpu.device))
    assert model.cpu() is model
    assert ts.get_model_statistics(model)["slot_access"] == "host"
    ts_models.assert_matches_plain("llama", plain, model, ids)
    model.cuda()
    assert ts.get_model_statistics(model)["device"].startswith("cuda:0")
    model.to(torch.device("cpu"))
    assert ts.get_model_statistics(model)["device"] == "cpu"
    if gpu.double is not None:
        assert gpu.double.live_streams == 0, "each placement's compute stream is destroyed with it"


@pytest.mark.parametrize("verify", [False, True], ids=["unverified", "verified"])
def test_gpudirect_reads_straight_into_the_slots_or_bounces_to_verify(ts_models, tmp_path, double, verify):
    plain, model = _offload(ts_models, tmp_path, device="cuda:0", backend="gpudirect", verify_checksums=verify)
    ts_models.assert_matches_plain("llama", plain, model, ts_models.input_ids())
    stats = ts.get_model_statistics(model)
    assert stats["backend"] == "cufile" and stats["transfer"] == "gpudirect"
    assert stats["slot_access"] == "device_direct"
    if verify:  # every byte that reached a weight was verified on the CPU, then copied
        assert stats["direct_bytes"] == 0 and stats["h2d_bytes"] > 0
    else:
        assert stats["direct_bytes"] > 0


@pytest.mark.parametrize("compression", [False, True], ids=["raw", "compressed"])
def test_the_host_tier_keeps_what_leaves_vram(ts_models, tmp_path, double, compression):
    plain, model = _offload(ts_models, tmp_path, device="cuda:0", budget=0.3, host_cache_gb=1.0,
                            compression_enabled=compression, prefetch_strategy="none")
    ids = ts_models.input_ids()
    ts_models.assert_matches_plain("llama", plain, model, ids)  # fills the tier on the first pass
    ts.get_model_statistics(model, reset=True)
    with torch.no_grad():
        ts_models.assert_equal(ts_models.forward("llama", model, ids), ts_models.forward("llama", plain, ids))
    stats = ts.get_model_statistics(model)
    assert stats["tiers"]["host"]["hits"] > 0 and stats["host_tier_held_bytes"] > 0
    assert stats["bytes_read"] - stats["row_bytes_read"] == 0, "everything that left VRAM came back from RAM"
    assert stats["tiers"]["storage"]["loads"] == 0
    _, off = _offload(ts_models, tmp_path / "off", device="cuda:0", budget=0.3, host_cache_gb=0,
                      prefetch_strategy="none")
    with torch.no_grad():
        ts_models.forward("llama", off, ids)
        ts.get_model_statistics(off, reset=True)
        ts_models.forward("llama", off, ids)
    assert ts.get_model_statistics(off)["host_tier_hits"] == 0 and ts.get_model_statistics(off)["bytes_read"] > 0


def test_host_cache_values(tmp_path, monkeypatch):
    from tensorstream.config import spare_memory_bytes
    assert ts.Config(storage_path=str(tmp_path)).host_cache_bytes == spare_memory_bytes() >= 0
    assert ts.Config(storage_path=str(tmp_path), host_cache_gb=0).host_cache_bytes == 0
    monkeypatch.setenv("TENSORSTREAM_HOST_CACHE_GB", "1.5")
    assert ts.Config(storage_path=str(tmp_path)).host_cache_bytes == 1_500_000_000
    monkeypatch.setenv("TENSORSTREAM_HOST_CACHE_GB", "lots")
    with pytest.raises(ts.ConfigError) as caught:
        ts.Config(storage_path=str(tmp_path))
    assert caught.value.field == "TENSORSTREAM_HOST_CACHE_GB"
    monkeypatch.delenv("TENSORSTREAM_HOST_CACHE_GB")
    for bad in (-1, "2", float("nan"), True):
        with pytest.raises(ts.ConfigError) as caught:
            ts.Config(storage_path=str(tmp_path), host_cache_gb=bad)
        assert caught.value.field == "host_cache_gb"


def test_the_trace_of_a_gpu_model_shows_the_copy_stream_beside_compute(ts_models, tmp_path, double):
    import json
    from tensorstream import trace_plot
    trace_path = tmp_path / "trace.json"
    plain, model = _offload(ts_models, tmp_path, device="cuda:0", trace_path=str(trace_path))
    ts_models.assert_matches_plain("llama", plain, model, ts_models.input_ids())
    ts.write_trace(model)
    trace = json.loads(trace_path.read_text())
    copies = [e for e in trace["traceEvents"] if e.get("cat") == "copy"]
    assert copies and all(e["args"]["lane"] == "copy stream" for e in copies)
    assert sum(e["args"]["bytes"] for e in copies) == ts.get_model_statistics(model)["h2d_bytes"]
    lanes = [lane.label for lane in trace_plot.trace_lanes(trace)]
    assert lanes.index("copy stream") == lanes.index("compute") + 2  # compute, stall, then the copy stream


def test_a_dtype_change_is_refused_and_the_model_stays_usable(ts_models, tmp_path, double):
    plain, model = _offload(ts_models, tmp_path, device="cuda:0")
    with pytest.raises(ts.ConfigError) as caught:
        model.to(torch.float16)
    assert caught.value.field == "dtype"
    ts_models.assert_matches_plain("llama", plain, model, ts_models.input_ids())


def test_an_injected_copy_error_is_a_cuda_error_and_the_next_forward_works(ts_models, tmp_path, double):
    plain, model = _offload(ts_models, tmp_path, device="cuda:0", budget=0.5)
    ids = ts_models.input_ids()
    double.fail_next("cuMemcpyHtoDAsync", 719)
    with torch.no_grad(), pytest.raises(ts.CudaError) as caught:
        ts_models.forward("llama", model, ids)
    assert "cuMemcpyHtoDAsync" in str(caught.value) and "CUDA_ERROR_LAUNCH_FAILED" in str(caught.value)
    ts_models.assert_matches_plain("llama", plain, model, ids)


def test_the_budget_on_a_device_holds_the_resident_set_too(ts_models, tmp_path, double):
    plain = ts_models.plain("llama")
    model = copy.deepcopy(plain)
    with pytest.raises(ts.ConfigError) as caught:
        ts.offload(model, ts_models.make_config(tmp_path, vram_budget_gb=1e-6), device="cuda:0")
    assert caught.value.field == "vram_budget_gb"
    assert "resident set" in str(caught.value) and "Raise vram_budget_gb to at least" in str(caught.value)
    with torch.no_grad():  # refused before anything changed
        ts_models.assert_equal(ts_models.forward("llama", model, ts_models.input_ids()),
                               ts_models.forward("llama", plain, ts_models.input_ids()))


def test_backends_that_cannot_reach_the_placement_are_refused(ts_models, tmp_path, double):
    plain = ts_models.plain("llama")
    with pytest.raises(ts.ConfigError) as caught:
        ts.offload(copy.deepcopy(plain), ts_models.make_config(tmp_path, backend="pread"), device="cuda:0")
    assert caught.value.field == "backend"
    with pytest.raises(ts.ConfigError) as caught:
        ts.offload(copy.deepcopy(plain), ts_models.make_config(tmp_path, backend="cuda"))
    assert caught.value.field == "backend"
    model = ts_models.track(ts.offload(copy.deepcopy(plain), ts_models.make_config(tmp_path, backend="pread")))
    with pytest.raises(ts.ConfigError) as caught:
        model.to("cuda:0")
    assert caught.value.field == "backend"
    ts_models.assert_matches_plain("llama", plain, model, ts_models.input_ids())  # still on the CPU, still works


def test_without_a_driver_a_cuda_device_is_a_config_error_with_the_reason(ts_models, tmp_path):
    if ts.cuda_available():
        pytest.skip("this machine has a CUDA driver")
    plain = ts_models.plain("llama")
    model = copy.deepcopy(plain)
    with pytest.raises(ts.ConfigError) as caught:
        ts.offload(model, ts_models.make_config(tmp_path, device="cuda:0"))
    assert caught.value.field == "device" and "libcuda.so.1" in str(caught.value)
    offloaded = ts_models.track(ts.offload(model, ts_models.make_config(tmp_path)))
    with pytest.raises(ts.ConfigError) as caught:
        offloaded.to("cuda:0")
    assert caught.value.field == "device"
    ts_models.assert_matches_plain("llama", plain, offloaded, ts_models.input_ids())


def test_device_values(tmp_path, monkeypatch):
    assert ts.Config(storage_path=str(tmp_path)).device == "cpu"
    assert ts.Config(storage_path=str(tmp_path), device="cuda:1").device == "cuda:1"
    assert ts.Config(storage_path=str(tmp_path), device=torch.device("cuda", 2)).device == "cuda:2"
    for bad in ("tpu", "cuda:x", "cpu:0", 3):
        with pytest.raises(ts.ConfigError) as caught:
            ts.Config(storage_path=str(tmp_path), device=bad)
        assert caught.value.field == "device"
    monkeypatch.setenv("TENSORSTREAM_DEVICE", "cuda")
    assert ts.Config(storage_path=str(tmp_path)).device == "cuda"
    assert resolve_placement("cpu").name == "cpu"
    with pytest.raises(ts.ConfigError):
        resolve_placement("xpu")
