"""Chrome traces (tensorstream/trace.py): written at cleanup and on demand, the engine's events and the hooks' compute
spans for every streamed block, in causal and per-lane order; TENSORSTREAM_TRACE; errors that name the field.

Nothing here asserts a duration: only which events exist, their order where causality fixes it, and byte counts.
"""

from __future__ import annotations

import gc
import json
import logging
from collections import defaultdict

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tensorstream as ts  # noqa: E402
from tensorstream import _core  # noqa: E402
from tensorstream.trace import TraceCollector, build_chrome_trace  # noqa: E402
from tensorstream.torch.offload import STATE_ATTR  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)
VOCAB = 96
EPS_US = 1e-3  # ts and dur are microseconds rounded to the nanosecond


def tiny_llama(layers=3):
    """A 3-layer Llama with seeded random weights (as python/tests/torch/conftest.py builds them)."""
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=0,
                                   tie_word_embeddings=False)
    torch.manual_seed(2)
    return transformers.LlamaForCausalLM(cfg).eval()


def offload(storage_path, **options):
    settings = dict(storage_path=str(storage_path), min_layer_size=0, num_io_threads=2,
                    vram_budget_gb=0.0002)  # about two layers: every pass reads most blocks again
    settings.update(options)
    return ts.offload(tiny_llama(), ts.Config(**settings))


def generate(model, new_tokens=3):
    ids = torch.randint(2, VOCAB, (1, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def streamed_blocks(model):
    state = model.__dict__[STATE_ATTR]
    return [sb.name for sb in state.runtime.blocks]


def spans(trace, kind=None):
    return [e for e in trace["traceEvents"] if e["ph"] == "X" and (kind is None or e["cat"] == kind)]


def by_block(events):
    out = defaultdict(list)
    for e in events:
        out[e["args"]["block"]].append(e)
    return out


def load(path):
    with open(path) as f:
        return json.load(f)


def test_generation_trace_has_every_kind_for_every_block_in_order(storage_path, tmp_path):
    path = tmp_path / "trace.json"
    model = offload(storage_path, trace_path=str(path), compression_enabled=True)
    names = streamed_blocks(model)
    assert len(names) >= 4
    generate(model)
    assert not path.exists()  # written at cleanup, not before
    model.cleanup_tensorstream()

    trace = load(path)
    assert trace["displayTimeUnit"] == "ms"
    other = trace["otherData"]
    assert other["backend"] in ("pread", "io_uring", "mmap") and other["budget_bytes"] > 0
    assert other["dropped_events"] == 0 and other["clock"] == "CLOCK_MONOTONIC"
    reads, verifies, computes = by_block(spans(trace, "read")), by_block(spans(trace, "verify")), \
        by_block(spans(trace, "compute"))
    assert by_block(spans(trace, "decompress"))  # compressed store: chunks were decoded
    for name in names:
        assert reads[name], f"no read of {name}"
        assert verifies[name], f"no checksum of {name}"
        assert computes[name], f"no compute span of {name}"
        for compute in computes[name]:
            # Block i computes only once its bytes are in: some read of block i ended before.
            assert any(r["ts"] + r["dur"] <= compute["ts"] + EPS_US for r in reads[name]), name
            assert compute["name"] == f"compute {name}" and compute["args"]["bytes"] > 0
        for read in reads[name]:
            assert read["args"]["bytes"] > 0 and read["args"]["block_index"] >= 0

    # Lanes are named threads, and the spans of one lane never overlap (ts is monotonic along each lane).
    thread_names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    per_lane = defaultdict(list)
    for e in spans(trace):
        assert e["dur"] >= 0
        assert e["tid"] in thread_names
        per_lane[e["tid"]].append(e)
    for tid, events in per_lane.items():
        events.sort(key=lambda e: (e["ts"], e["dur"]))
        for before, after in zip(events, events[1:]):
            assert after["ts"] + EPS_US >= before["ts"] + before["dur"], \
                f"lane {thread_names[tid]}: {after['name']} starts inside {before['name']}"
    lane_names = set(thread_names.values())
    assert any(n.startswith("io ") for n in lane_names) and any(n.startswith("worker ") for n in lane_names)
    assert any("MainThread" in n for n in lane_names)
    compute_tids = {e["tid"] for e in spans(trace, "compute")}
    assert {e["tid"] for e in spans(trace, "stall")} <= compute_tids  # stalls are on the computing thread


def test_trace_bytes_and_stalls_match_the_statistics(storage_path, tmp_path):
    path = tmp_path / "trace.json"
    # No prefetch: nothing is in flight once generate() returns, so the statistics see every read the trace has.
    model = offload(storage_path, trace_path=str(path), prefetch_strategy="none")
    generate(model)
    stats = ts.get_model_statistics(model)
    model.cleanup_tensorstream()
    trace = load(path)
    assert sum(e["args"]["bytes"] for e in spans(trace, "read")) == stats["bytes_read"]
    assert trace["otherData"]["bytes_read"] == stats["bytes_read"]
    assert sum(e["dur"] for e in spans(trace, "stall")) / 1e6 == pytest.approx(stats["stall_time_s"], abs=1e-6)
    assert stats["misses"] > 0 and spans(trace, "stall")  # every miss waits without prefetch


def test_write_trace_on_demand_then_at_cleanup(storage_path, tmp_path):
    path = tmp_path / "trace.json"
    model = offload(storage_path, trace_path=str(path))
    generate(model, new_tokens=1)
    early = tmp_path / "early.json"
    assert ts.write_trace(model, str(early)) == str(early)
    first = load(early)
    assert spans(first, "compute") and spans(first, "read")
    assert ts.write_trace(model) == str(path)  # default: the configured path
    generate(model, new_tokens=1)  # tracing continues after a write
    model.cleanup_tensorstream()
    final = load(path)
    assert len(spans(final, "compute")) > len(spans(first, "compute"))
    with pytest.raises(ts.ConfigError) as caught:
        ts.write_trace(model)  # cleaned up: the trace was written, the model is plain again
    assert caught.value.field == "model"


def test_environment_variable_turns_tracing_on(storage_path, tmp_path, monkeypatch):
    path = tmp_path / "from-env.json"
    monkeypatch.setenv("TENSORSTREAM_TRACE", str(path))
    model = offload(storage_path)
    assert model.__dict__[STATE_ATTR].config.trace_path == str(path)
    assert model.__dict__[STATE_ATTR].engine.tracing
    generate(model, new_tokens=1)
    model.cleanup_tensorstream()
    assert spans(load(path), "compute")


def test_off_by_default_and_write_trace_errors(storage_path, tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORSTREAM_TRACE", raising=False)
    with pytest.raises(ts.ConfigError) as caught:
        ts.write_trace(tiny_llama())
    assert caught.value.field == "model"
    model = offload(storage_path)
    state = model.__dict__[STATE_ATTR]
    assert state.runtime.tracer is None and not state.engine.tracing
    with pytest.raises(ts.ConfigError) as caught:
        ts.write_trace(model, str(tmp_path / "t.json"))
    assert caught.value.field == "trace_path" and "TENSORSTREAM_TRACE" in str(caught.value)
    model.cleanup_tensorstream()

    traced = offload(storage_path, trace_path=str(tmp_path / "t.json"))
    with pytest.raises(ts.ConfigError) as caught:
        ts.write_trace(traced, str(tmp_path / "missing" / "t.json"))
    assert caught.value.field == "path"
    traced.cleanup_tensorstream()


def test_bad_trace_directory_at_offload_leaves_the_model_alone(storage_path, tmp_path):
    (tmp_path / "d").mkdir()
    config = ts.Config(storage_path=str(storage_path), min_layer_size=0, trace_path=str(tmp_path / "d" / "t.json"))
    (tmp_path / "d").rmdir()  # gone by the time the model is offloaded
    model = tiny_llama()
    with pytest.raises(ts.ConfigError) as caught:
        ts.offload(model, config)
    assert caught.value.field == "trace_path"
    assert STATE_ATTR not in model.__dict__


def test_trace_is_written_when_an_offloaded_model_is_collected(storage_path, tmp_path):
    path = tmp_path / "gc.json"
    model = offload(storage_path, trace_path=str(path))
    generate(model, new_tokens=1)
    del model
    gc.collect()
    assert spans(load(path), "compute")


def test_engine_keeps_its_last_events_when_closed(storage_path):
    blocks = {f"layers.{i}": {f"layers.{i}.w": torch.arange(3000, dtype=torch.float32) + i} for i in range(3)}
    ts.write_model(storage_path, blocks, model_id="m", chunk_size=4096)
    arena = torch.empty(1 << 20, dtype=torch.uint8)
    engine = _core.Engine(_core.StorageDirectory.open_existing(str(storage_path)), "m", arena.data_ptr(),
                          arena.numel(), backend="pread", direct_io="off", num_io_threads=2,
                          prefetch_strategy="none")
    assert not engine.tracing
    with pytest.raises(ts.ConfigError):
        engine.enable_tracing(0)
    engine.enable_tracing()
    assert engine.tracing
    for block in range(3):
        engine.acquire(block).wait()
        engine.release(block)
    engine.close()
    assert not engine.tracing
    events, dropped = engine.drain_trace()
    assert dropped == 0
    kinds = {(kind, block) for kind, block, *_rest in events}
    assert {("read", b) for b in range(3)} <= kinds and {("verify", b) for b in range(3)} <= kinds
    for kind, block, tensor, chunk, nbytes, start, end, lane_kind, lane_index in events:
        assert start <= end and lane_kind in ("io", "worker", "caller")
    assert engine.drain_trace() == ([], 0)  # handed over once


# ---- the Chrome format on its own (no engine) ----------------------------------------------------------------


class FakeEngine:
    def __init__(self, events, dropped=0):
        self.batches = [(events, dropped)]

    def drain_trace(self):
        return self.batches.pop() if self.batches else ([], 0)


def test_chrome_trace_format():
    events = [("read", 0, 2, 1, 4096, 1_000_000, 1_500_000, "io", 0),
              ("verify", 0, 2, 1, 4096, 1_600_000, 1_700_000, "worker", 1),
              ("stall", 0, -1, -1, 0, 1_200_000, 1_750_000, "caller", 4242),
              ("compute", 0, -1, -1, 999, 1_800_000, 2_800_000, "caller", 4242)]
    trace = build_chrome_trace(events, dropped=3, block_names={0: "layers.0"}, tensor_names=["a", "b", "w"],
                               thread_names={4242: "MainThread"}, other_data={"backend": "pread", "budget_bytes": 7})
    json.dumps(trace)  # serialisable as is
    assert trace["displayTimeUnit"] == "ms"
    other = trace["otherData"]
    assert other["backend"] == "pread" and other["budget_bytes"] == 7 and other["dropped_events"] == 3
    assert other["t0_monotonic_ns"] == 1_000_000 and other["bytes_read"] == 4096
    assert other["compute_s"] == pytest.approx(1e-3) and other["stall_s"] == pytest.approx(0.55e-3)
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert sorted(names.values()) == ["MainThread (thread 4242)", "io 0", "worker 1"]
    assert min(names, key=lambda tid: tid) == next(t for t, n in names.items() if n.startswith("MainThread"))
    read = next(e for e in trace["traceEvents"] if e.get("cat") == "read")
    assert read == {"name": "read layers.0", "cat": "read", "ph": "X", "pid": 1, "tid": read["tid"], "ts": 0.0,
                    "dur": 500.0, "args": {"block": "layers.0", "block_index": 0, "bytes": 4096, "lane": "io 0",
                                           "tensor": "w", "chunk": 1}}
    compute = next(e for e in trace["traceEvents"] if e.get("cat") == "compute")
    assert compute["ts"] == 800.0 and compute["dur"] == 1000.0 and "chunk" not in compute["args"]
    assert compute["tid"] == next(e for e in trace["traceEvents"] if e.get("cat") == "stall")["tid"]


def test_collector_bounds_what_it_keeps(tmp_path):
    engine_events = [("read", 0, -1, -1, 10, i, i + 1, "io", 0) for i in range(8)]
    collector = TraceCollector(FakeEngine(engine_events, dropped=2), str(tmp_path / "t.json"), block_names={},
                               block_bytes={}, tensor_names=[], other_data={}, max_events=5)
    collector.compute(0, 100, 200)
    collector.compute(0, 300, 400)
    path = collector.write()
    trace = load(path)
    assert len(spans(trace)) == 5
    assert trace["otherData"]["dropped_events"] == 2 + (8 - 3)  # the engine's own drops plus ours
    collector.close()  # writes once more, then never again
    collector.close()
