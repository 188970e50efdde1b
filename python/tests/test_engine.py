"""The streaming engine through its Python binding (tensorstream._core.Engine): exact bytes, statistics, budget,
errors as TensorStream exceptions, and the GIL released while the engine blocks."""

from __future__ import annotations

import ctypes
import threading
import time

import pytest

torch = pytest.importorskip("torch")

import tensorstream as ts  # noqa: E402
from tensorstream import _core  # noqa: E402
from conftest import assert_bitwise_equal, compressible_bf16, flip_bit, random_tensor  # noqa: E402


def write_layers(storage, count, numel=20000, compression_level=0, seed=0):
    blocks = {
        f"layers.{i}": {
            f"layers.{i}.w": compressible_bf16(numel, seed + i),
            f"layers.{i}.b": random_tensor([37], torch.float32, seed + 100 + i),
        }
        for i in range(count)
    }
    result = ts.write_model(storage, blocks, model_id="m", compression_level=compression_level, chunk_size=16384)
    return blocks, result


def aligned_arena(nbytes):
    """A uint8 tensor whose data starts on a 4 KiB boundary (what O_DIRECT needs), and the address."""
    raw = torch.empty(nbytes + 4096, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % 4096
    arena = raw[offset:offset + nbytes]
    return raw, arena


def view_tensor(ticket, info):
    """The tensor `info` inside the block a ticket delivered: a zero-copy view of the slot."""
    dtype = getattr(torch, info["dtype"])
    if info["nbytes"] == 0:
        return torch.empty(info["shape"], dtype=dtype)
    buffer = (ctypes.c_uint8 * info["nbytes"]).from_address(ticket.address + info["slot_offset"])
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(info["shape"])


def make_engine(storage_path, arena, **options):
    storage = _core.StorageDirectory.open_existing(str(storage_path))
    defaults = dict(backend="pread", direct_io="off", num_io_threads=2, prefetch_strategy="next_layer")
    defaults.update(options)
    return _core.Engine(storage, "m", arena.data_ptr(), arena.numel(), **defaults)


def slot_bytes(storage_path):
    with ts.open_model(storage_path, "m") as model:
        return [model.block_info(name)["slot_size"] for name in model.block_names()]


@pytest.mark.parametrize("backend", ["pread", "io_uring", "mmap"])
@pytest.mark.parametrize("compression_level", [0, 5])
def test_blocks_arrive_bit_exact(tmp_path, backend, compression_level):
    blocks, _ = write_layers(tmp_path, 5, compression_level=compression_level)
    slots = slot_bytes(tmp_path)
    _raw, arena = aligned_arena(sum(slots))
    engine = make_engine(tmp_path, arena, backend=backend)
    reader = ts.open_model(tmp_path, "m")
    for passes in range(2):
        if passes == 1:
            first = engine.stats()
            engine.reset_stats()
        for index, name in enumerate(reader.block_names()):
            ticket = engine.acquire(index)
            ticket.wait()
            assert ticket.ready and ticket.nbytes >= slots[index]
            for tensor_name in reader.block_tensor_names(name):
                info = reader.info(tensor_name)
                assert_bitwise_equal(view_tensor(ticket, info), blocks[name][tensor_name],
                                     f"{backend} pass {passes} {tensor_name}")
            engine.release(index)
    assert first["acquires"] == 5 and first["checksum_failures"] == 0 and len(first["blocks"]) == 5
    assert first["bytes_delivered"] == sum(t.numel() * t.element_size() for b in blocks.values() for t in b.values())
    second = engine.stats()
    assert second["hits"] == 5 and second["bytes_read"] == 0  # everything fits: the second pass reads nothing
    engine.close()


def test_budget_bounds_what_is_held_and_reads_follow_the_policy(tmp_path):
    write_layers(tmp_path, 8)
    slot = slot_bytes(tmp_path)[0]
    _raw, arena = aligned_arena(slot * 4)
    engine = make_engine(tmp_path, arena, prefetch_strategy="none")
    for _ in range(3):
        engine.reset_stats()
        for index in range(8):
            engine.acquire(index).wait()
            engine.release(index)
            assert engine.stats()["resident_bytes"] + engine.stats()["in_flight_bytes"] <= engine.budget_bytes
    stats = engine.stats()
    # 4 slots, a ring of 3: one block stays, seven stream (furthest-next-use may save a little).
    assert 4 * slot <= stats["bytes_read"] <= 7 * slot
    assert stats["evictions"] > 0
    evicted = []
    engine.set_eviction_callback(evicted.append)
    engine.set_budget(slot * 3)
    assert engine.budget_bytes == slot * 3
    assert engine.stats()["resident_bytes"] <= slot * 3
    assert all(0 <= b < 8 for b in evicted)


def test_corrupt_chunk_raises_corruption_error_naming_the_tensor(tmp_path):
    write_layers(tmp_path, 3)
    with ts.open_model(tmp_path, "m") as model:
        info = model.info("layers.1.w")
        flip_bit(model.data_path, info["raw_file_offset"] + 5000)
    _raw, arena = aligned_arena(sum(slot_bytes(tmp_path)))
    engine = make_engine(tmp_path, arena, prefetch_strategy="none")
    ticket = engine.acquire(1)
    with pytest.raises(ts.CorruptionError) as caught:
        ticket.wait()
    assert caught.value.tensor == "layers.1.w" and caught.value.model == "m"
    engine.release(1)
    engine.acquire(0).wait()  # the engine stays usable
    engine.release(0)
    assert engine.stats()["checksum_failures"] == 1


def test_bad_options_are_config_errors(tmp_path):
    write_layers(tmp_path, 2)
    _raw, arena = aligned_arena(sum(slot_bytes(tmp_path)))
    for options, field in [(dict(num_io_threads=0), "num_io_threads"), (dict(backend="gpudirect2"), "backend"),
                           (dict(prefetch_strategy="sometimes"), "prefetch_strategy"),
                           (dict(memory_pressure_mode="relaxed"), "memory_pressure_mode")]:
        with pytest.raises(ts.ConfigError) as caught:
            make_engine(tmp_path, arena, **options)
        assert caught.value.field == field
    engine = make_engine(tmp_path, arena)
    with pytest.raises(ts.ConfigError):
        engine.acquire(2)


def test_config_from_env_is_strict(monkeypatch):
    monkeypatch.setenv("TENSORSTREAM_IO_THREADS", "3")
    monkeypatch.setenv("TENSORSTREAM_VRAM_BUDGET", "0.5")
    config = _core.config_from_env()
    assert config["num_io_threads"] == 3 and config["budget_bytes"] == 500_000_000
    monkeypatch.setenv("TENSORSTREAM_IO_THREADS", "three")
    with pytest.raises(ts.ConfigError) as caught:
        _core.config_from_env()
    assert caught.value.field == "TENSORSTREAM_IO_THREADS"


def test_waiting_releases_the_gil(tmp_path):
    """While one thread blocks in the engine, another Python thread keeps running."""
    # Stored as int16 so that they take zstd (about 1 GB/s of decode per core), not the exponent codec of floats,
    # which decodes 8 MB faster than the 10 ms this test needs a call to take.
    blocks = {f"layers.{i}": {f"layers.{i}.w": compressible_bf16(16_000_000, i).view(torch.int16)} for i in range(4)}
    ts.write_model(tmp_path, blocks, model_id="m", compression_level=5)
    _raw, arena = aligned_arena(sum(slot_bytes(tmp_path)))
    engine = make_engine(tmp_path, arena, prefetch_strategy="none", num_io_threads=1)
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        time.sleep(0.05)
        best = 0
        for index in range(4):
            before = counter[0]
            started = time.perf_counter()
            ticket = engine.acquire(index)  # decompressing 8 MB of zstd takes tens of milliseconds
            ticket.wait()
            elapsed = time.perf_counter() - started
            if elapsed > 0.01:
                best = max(best, counter[0] - before)
            engine.release(index)
    finally:
        stop.set()
        thread.join()
    # Holding the GIL for the whole call would let the spinner run only at switch intervals (5 ms).
    assert best > 10_000, f"spinner advanced only {best} times while the engine worked"


def test_learned_order_and_lookahead_are_exposed(tmp_path):
    write_layers(tmp_path, 4)
    _raw, arena = aligned_arena(sum(slot_bytes(tmp_path)))
    engine = make_engine(tmp_path, arena, prefetch_strategy="adaptive")
    for _ in range(2):
        for index in [2, 0, 1, 3]:
            engine.acquire(index).wait()
            engine.release(index)
    assert engine.learned_order() == [2, 0, 1, 3]
    assert engine.lookahead >= 1
    # ADAPTIVE's check of prefetch on against off: passes of microseconds are not compared, prefetch stays on.
    for _ in range(12):  # a check starts 8 passes after the order is known
        for index in [2, 0, 1, 3]:
            engine.acquire(index).wait()
            engine.release(index)
    assert engine.prefetch_checks == 1 and engine.prefetch_off is False and engine.lookahead >= 1
    assert engine.backend_name == "pread"


def test_closed_engine_refuses_every_call(tmp_path):
    write_layers(tmp_path, 2)
    _raw, arena = aligned_arena(sum(slot_bytes(tmp_path)))
    engine = make_engine(tmp_path, arena)
    engine.close()
    assert engine.closed
    for call in (lambda: engine.stats(), lambda: engine.budget_bytes, lambda: engine.set_budget(1 << 20),
                 lambda: engine.learned_order(), lambda: engine.acquire(0), lambda: engine.backend_name):
        with pytest.raises(ts.ConfigError):
            call()


def test_failing_eviction_callback_is_reported_not_fatal(tmp_path, capfd):
    write_layers(tmp_path, 6)
    slot = slot_bytes(tmp_path)[0]
    _raw, arena = aligned_arena(slot * 3)
    engine = make_engine(tmp_path, arena, prefetch_strategy="adaptive")

    def explode(block):
        raise RuntimeError(f"callback failure for {block}")

    engine.set_eviction_callback(explode)
    for _ in range(2):
        for index in range(6):
            engine.acquire(index).wait()
            engine.release(index)
    assert engine.stats()["evictions"] > 0
    assert "eviction callback failed" in capfd.readouterr().err
    engine.close()


def test_mmap_counts_the_bytes_it_faults_in(tmp_path):
    write_layers(tmp_path, 3)
    _raw, arena = aligned_arena(sum(slot_bytes(tmp_path)))
    engine = make_engine(tmp_path, arena, backend="mmap", prefetch_strategy="none")
    for index in range(3):
        engine.acquire(index).wait()
        engine.release(index)
    assert engine.stats()["bytes_read"] > 0
    engine.close()


def test_a_block_prefetched_in_time_is_ready_but_no_reuse_until_its_next_use(tmp_path):
    """Statistics (issue #16 item 7): hits = resident when asked, reuses = resident with no read for this use."""
    write_layers(tmp_path, 2)
    slots = slot_bytes(tmp_path)
    _raw, arena = aligned_arena(sum(slots))
    engine = make_engine(tmp_path, arena, prefetch_strategy="none")
    engine.prefetch(0)
    deadline = time.monotonic() + 30
    while engine.stats()["resident_bytes"] < slots[0]:  # the prefetch has landed
        assert time.monotonic() < deadline
        time.sleep(0.005)
    for use in range(2):
        ticket = engine.acquire(0)
        ticket.wait()
        engine.release(0)
    s = engine.stats()
    assert s["acquires"] == 2 and s["hits"] == 2 and s["reuses"] == 1 and s["prefetch_hits"] == 1
    assert s["blocks"][0]["loads"] == 1 and s["blocks"][0]["reuses"] == 1
    engine.close()
