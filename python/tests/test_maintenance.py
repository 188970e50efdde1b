"""Corruption is always detected (bit-flip sweeps over whole data files, spliced chunks), and the maintenance
functions: verify_storage_integrity, cleanup_orphaned_files, defragment_storage, record_execution_order."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time

import pytest
import torch

import tensorstream as ts
from conftest import (assert_bitwise_equal, chunk_map, compressible_bf16, data_path, flip_bit,
                      random_tensor, write_byte)

CHUNK = 4096


def sweep_blocks(kind: str):
    """Two blocks with multi-chunk, single-chunk and tiny tensors; sizes leave padding between tensors and blocks."""
    if kind == "exponent":  # floats take the exponent codec
        make = lambda n, seed: compressible_bf16(n, seed=seed)  # noqa: E731
    elif kind == "zstd":  # the same bytes as int16 take zstd
        make = lambda n, seed: compressible_bf16(n, seed=seed).view(torch.int16)  # noqa: E731
    else:
        make = lambda n, seed: random_tensor((n,), torch.bfloat16, seed=seed)  # noqa: E731
    return {
        "block0": {"t0": make(5000, 1), "t1": random_tensor((300,), torch.int8, seed=2)},
        "block1": {"t2": make(2500, 3), "t3": random_tensor((), torch.float64, seed=4)},
    }


SWEEP_LEVELS = {"raw": 0, "exponent": 5, "zstd": 5, "incompressible": 5}


def region_of(chunks, offset):
    for chunk in chunks:
        if chunk["offset"] <= offset < chunk["offset"] + chunk["size"]:
            return chunk
    return None


def padding_offsets(chunks, data_size):
    """The first byte of every gap between chunks and of the tail (alignment padding)."""
    out, cursor = [], 0
    for chunk in sorted(chunks, key=lambda c: c["offset"]):
        if chunk["offset"] > cursor:
            out.append(cursor)
        cursor = chunk["offset"] + chunk["size"]
    if data_size > cursor:
        out.append(cursor)
    return out


@pytest.mark.parametrize("kind", ["raw", "exponent", "zstd", "incompressible"])
def test_bit_flip_sweep_never_returns_wrong_bytes(storage_path, kind):
    blocks = sweep_blocks(kind)
    model_id = f"sweep-{kind}"
    ts.write_model(storage_path, blocks, model_id=model_id, chunk_size=CHUNK, compression_level=SWEEP_LEVELS[kind])
    expected = {name: t for tensors in blocks.values() for name, t in tensors.items()}
    block_of = {name: block for block, tensors in blocks.items() for name in tensors}
    chunks = chunk_map(storage_path, model_id)
    path = data_path(storage_path, model_id)
    size = path.stat().st_size
    codecs = {c["codec"] for c in chunks if c["tensor"] in ("t0", "t2")}
    assert codecs == ({kind} if kind in ("exponent", "zstd") else {"raw"})
    assert len([c for c in chunks if c["tensor"] == "t0"]) == 3  # 10000 raw bytes in 4 KiB chunks

    offsets = set(range(0, size, 97))
    for chunk in chunks:  # make sure every chunk (even an 8-byte one) and every padding region is hit
        offsets.update({chunk["offset"], chunk["offset"] + chunk["size"] - 1})
    padding = padding_offsets(chunks, size)
    assert padding, "the layout should have padding"
    offsets.update(padding)
    offsets.add(size - 1)

    hit_chunks, padding_flips = set(), 0
    with ts.open_model(storage_path, model_id) as model:
        for offset in sorted(offsets):
            original = flip_bit(path, offset, bit=offset % 8)
            try:
                chunk = region_of(chunks, offset)
                report = ts.verify_storage_integrity(storage_path)
                assert not report.ok, f"flip at {offset} not detected by verify"
                if chunk is not None:
                    hit_chunks.add((chunk["tensor"], chunk["chunk"]))
                    name = chunk["tensor"]
                    with pytest.raises(ts.CorruptionError) as info:
                        model.read(name)
                    error = info.value
                    assert (error.model, error.tensor, error.chunk, error.offset) == (
                        model_id, name, chunk["chunk"], chunk["offset"]), f"flip at {offset}"
                    assert model_id in str(error) and f"'{name}'" in str(error)
                    assert isinstance(error, OSError)
                    with pytest.raises(ts.CorruptionError) as info:
                        model.read_block(block_of[name])
                    assert info.value.tensor == name
                    bad = report.bad_chunks
                    assert [(b.model, b.tensor, b.chunk, b.offset) for b in bad] == [
                        (model_id, name, chunk["chunk"], chunk["offset"])]
                    others = [n for n in expected if n != name]
                else:
                    padding_flips += 1
                    [entry] = report.models
                    assert "data.padding" in entry.error and report.bad_chunks == []
                    others = list(expected)
                for other in others:  # everything else still reads, bit for bit
                    assert_bitwise_equal(model.read(other), expected[other], f"{other} after flip at {offset}")
                if chunk is None:
                    for block in blocks:
                        for other, tensor in model.read_block(block).items():
                            assert_bitwise_equal(tensor, expected[other], f"{other} (block) after flip at {offset}")
            finally:
                write_byte(path, offset, original)
    assert hit_chunks == {(c["tensor"], c["chunk"]) for c in chunks}
    assert padding_flips >= len(padding)
    assert ts.verify_storage_integrity(storage_path).ok


def test_spliced_chunks_are_detected(storage_path):
    blocks = {"b": {"a": random_tensor((3 * CHUNK,), torch.uint8, seed=1),
                    "c": random_tensor((CHUNK,), torch.uint8, seed=2),
                    "d": random_tensor((CHUNK,), torch.uint8, seed=3)}}
    ts.write_model(storage_path, blocks, model_id="m", chunk_size=CHUNK)
    chunks = {(c["tensor"], c["chunk"]): c for c in chunk_map(storage_path, "m")}
    path = data_path(storage_path, "m")
    pristine = path.read_bytes()

    def splice(source, target):
        data = bytearray(pristine)
        src, dst = chunks[source], chunks[target]
        assert src["size"] == dst["size"]
        data[dst["offset"]:dst["offset"] + dst["size"]] = pristine[src["offset"]:src["offset"] + src["size"]]
        path.write_bytes(bytes(data))
        return dst

    cases = [(("a", 0), ("a", 1)), (("a", 2), ("a", 0)), (("c", 0), ("d", 0)), (("a", 1), ("c", 0))]
    for source, target in cases:
        dst = splice(source, target)
        with ts.open_model(storage_path, "m") as model:
            with pytest.raises(ts.CorruptionError) as info:
                model.read(target[0])
            assert (info.value.tensor, info.value.chunk, info.value.offset) == (target[0], target[1], dst["offset"])
        report = ts.verify_storage_integrity(storage_path)
        assert [(b.tensor, b.chunk) for b in report.bad_chunks] == [target]
        path.write_bytes(pristine)

    # Swapping two chunks: both are reported.
    data = bytearray(pristine)
    a0, a1 = chunks[("a", 0)], chunks[("a", 1)]
    data[a0["offset"]:a0["offset"] + CHUNK], data[a1["offset"]:a1["offset"] + CHUNK] = (
        pristine[a1["offset"]:a1["offset"] + CHUNK], pristine[a0["offset"]:a0["offset"] + CHUNK])
    path.write_bytes(bytes(data))
    report = ts.verify_storage_integrity(storage_path)
    assert [(b.tensor, b.chunk) for b in report.bad_chunks] == [("a", 0), ("a", 1)]
    path.write_bytes(pristine)
    assert ts.verify_storage_integrity(storage_path).ok


def test_model_copied_from_another_store_is_refused(tmp_path):
    blocks = {"b": {"w": random_tensor((5000,), torch.uint8, seed=1)}}
    ts.write_model(tmp_path / "s1", blocks, model_id="m")
    ts.write_model(tmp_path / "s2", blocks, model_id="m")
    for name in ("manifest", "data"):
        shutil.copyfile(tmp_path / "s2" / "models" / "m" / name, tmp_path / "s1" / "models" / "m" / name)
    with pytest.raises(ts.FormatError) as info:
        ts.open_model(tmp_path / "s1", "m")
    assert info.value.rule == "manifest.store_id"
    report = ts.verify_storage_integrity(tmp_path / "s1")
    assert not report.ok and "manifest.store_id" in report.models[0].error


# ---- verify ------------------------------------------------------------------------------------------------------


def test_verify_good_store_and_report_shape(storage_path):
    ts.write_model(storage_path, {"b": {"w": torch.arange(100)}}, model_id="one")
    ts.write_model(storage_path, {"b": {"w": compressible_bf16(5000)}}, model_id="two", compression_level=3)
    report = ts.verify_storage_integrity(storage_path)
    assert report.ok and bool(report)
    assert [m.model for m in report.models] == ["one", "two"]
    assert all(m.ok and m.error == "" and m.bad_chunks == [] and m.chunks_checked >= 1 for m in report.models)
    assert report.models[0].bytes_checked == 800 and report.models[0].tensors == 1
    assert report.bad_chunks == [] and report.orphans == []
    as_dict = report.to_dict()
    assert json.loads(json.dumps(as_dict))["models"][1]["model"] == "two"
    text = str(report)
    assert "OK" in text and "one" in text and "two" in text
    only = ts.verify_storage_integrity(storage_path, model="two")
    assert [m.model for m in only.models] == ["two"]
    with pytest.raises(dataclass_frozen_error()):
        report.ok = False  # type: ignore[misc]


def dataclass_frozen_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_verify_reports_flipped_byte(storage_path):
    ts.write_model(storage_path, {"b0": {"x": torch.ones(10)}, "b1": {"w": random_tensor((3000,), torch.int32)}},
                   model_id="m", chunk_size=CHUNK)
    ts.write_model(storage_path, {"b": {"y": torch.ones(3)}}, model_id="fine")
    chunks = [c for c in chunk_map(storage_path, "m") if c["tensor"] == "w"]
    target = chunks[1]
    flip_bit(data_path(storage_path, "m"), target["offset"] + 17, bit=3)
    report = ts.verify_storage_integrity(storage_path)
    assert not report.ok
    assert report.failed_models == ["m"]
    [bad] = report.bad_chunks
    assert (bad.model, bad.tensor, bad.chunk, bad.offset) == ("m", "w", 1, target["offset"])
    assert "checksum" in bad.error
    text = str(report)
    assert "FAILED" in text and "'w'" in text and f"offset {target['offset']}" in text
    assert ts.verify_storage_integrity(storage_path, model="fine").ok


def test_verify_reports_model_level_problems(storage_path):
    ts.write_model(storage_path, {"b": {"w": torch.ones(10)}}, model_id="m")
    manifest = storage_path / "models" / "m" / "manifest"
    raw = bytearray(manifest.read_bytes())
    raw[0] ^= 0xFF
    manifest.write_bytes(bytes(raw))
    report = ts.verify_storage_integrity(storage_path)
    assert not report.ok and "manifest.magic" in report.models[0].error
    assert "manifest.magic" in str(report)


def test_storage_path_from_environment(storage_path, monkeypatch):
    ts.write_model(storage_path, {"b": {"w": torch.ones(1)}}, model_id="m")
    monkeypatch.delenv("TENSORSTREAM_STORAGE_PATH", raising=False)
    for call in (ts.verify_storage_integrity, ts.cleanup_orphaned_files, ts.defragment_storage):
        with pytest.raises(ts.ConfigError, match="TENSORSTREAM_STORAGE_PATH") as info:
            call()
        assert info.value.field == "TENSORSTREAM_STORAGE_PATH"
    monkeypatch.setenv("TENSORSTREAM_STORAGE_PATH", str(storage_path))
    assert ts.verify_storage_integrity().ok
    assert ts.cleanup_orphaned_files().removed == []
    assert [m.model for m in ts.defragment_storage().models] == ["m"]


def test_maintenance_on_missing_storage(tmp_path):
    for call in (ts.verify_storage_integrity, ts.cleanup_orphaned_files, ts.defragment_storage):
        with pytest.raises(ts.IoError):
            call(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


# ---- cleanup -----------------------------------------------------------------------------------------------------


def make_debris(storage_path):
    ts.write_model(storage_path, {"b": {"w": torch.arange(50)}}, model_id="good")
    ts.write_model(storage_path, {"b": {"w": torch.ones(5)}}, model_id="also-good", compression_level=1)
    dead = storage_path / "tmp" / "crashed.12345.0011223344556677"
    dead.mkdir()
    (dead / "data").write_bytes(b"x" * 1000)
    stray = storage_path / "models" / "good" / "data.old"
    stray.write_bytes(b"y" * 10)
    ghost = storage_path / "models" / "ghost"
    ghost.mkdir()
    (ghost / "data").write_bytes(b"z" * 100)
    old_loose = storage_path / "tmp" / "STORE.999.deadbeef"
    old_loose.write_bytes(b"s" * 40)
    an_hour_ago = time.time() - 3600
    os.utime(old_loose, (an_hour_ago, an_hour_ago))
    return {"dead": dead, "stray": stray, "ghost": ghost, "old_loose": old_loose}


def test_cleanup_removes_debris_and_keeps_models(storage_path):
    debris = make_debris(storage_path)
    fresh_loose = storage_path / "tmp" / "STORE.1.fresh"
    fresh_loose.write_bytes(b"s" * 40)  # might belong to a process creating the storage right now
    order_before = ts.record_execution_order(storage_path, "good", ["b"])
    assert order_before is None
    # Verify lists the debris as orphans, but it is not an error.
    report = ts.verify_storage_integrity(storage_path)
    assert report.ok
    assert sorted(report.orphans) == sorted(str(p) for p in debris.values())

    result = ts.cleanup_orphaned_files(storage_path)
    assert not result.dry_run
    assert sorted(result.removed) == sorted(str(p) for p in debris.values())
    assert result.bytes_freed == 1000 + 10 + 100 + 40
    assert result.kept_in_use == []
    assert all(not p.exists() for p in debris.values())
    assert fresh_loose.exists()
    assert ts.Storage(storage_path).models() == ["also-good", "good"]
    assert (storage_path / "models" / "good" / "execution_order").exists()  # a model file, not debris
    after = ts.verify_storage_integrity(storage_path)
    assert after.ok and after.orphans == [] and len(after.models) == 2
    assert "removed 4 orphan(s)" in str(result)
    assert ts.cleanup_orphaned_files(storage_path).removed == []


def test_cleanup_dry_run_removes_nothing(storage_path):
    debris = make_debris(storage_path)
    result = ts.cleanup_orphaned_files(storage_path, dry_run=True)
    assert result.dry_run and "would remove" in str(result)
    assert sorted(result.removed) == sorted(str(p) for p in debris.values())
    assert all(p.exists() for p in debris.values())
    assert result.to_dict()["bytes_freed"] == result.bytes_freed > 0


def test_cleanup_keeps_temp_dir_of_live_writer(storage_path):
    ts.write_model(storage_path, {"b": {"w": torch.ones(1)}}, model_id="m")
    live = storage_path / "tmp" / "busy.1.0123456789abcdef"
    live.mkdir()
    (live / "data").write_bytes(b"in progress")
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running writer holds
        result = ts.cleanup_orphaned_files(storage_path)
        assert result.removed == [] and result.kept_in_use == [str(live)]
        assert live.exists() and "writer still running" in str(result)
        assert ts.verify_storage_integrity(storage_path).orphans == []
    finally:
        os.close(fd)
    # The writer is gone now: its directory is debris.
    assert ts.cleanup_orphaned_files(storage_path).removed == [str(live)]
    assert not live.exists()


# ---- defragment --------------------------------------------------------------------------------------------------


def layered_blocks(n=5, compressed=False):
    make = (lambda i: compressible_bf16(3000 + 100 * i, seed=i)) if compressed else (
        lambda i: random_tensor((2000 + 37 * i,), torch.float32, seed=i))
    return {f"layer{i}": {f"layer{i}.weight": make(i), f"layer{i}.bias": random_tensor((i + 1,), torch.float16,
                                                                                        seed=100 + i)}
            for i in range(n)}


@pytest.mark.parametrize("compressed", [False, True])
def test_defragment_follows_recorded_order(storage_path, compressed):
    blocks = layered_blocks(compressed=compressed)
    saved = ts.write_model(storage_path, blocks, model_id="m", chunk_size=CHUNK,
                           compression_level=5 if compressed else 0)
    ts.write_model(storage_path, {"b": {"w": torch.ones(3)}}, model_id="other")
    names = list(blocks)
    expected = {n: t for tensors in blocks.values() for n, t in tensors.items()}

    untouched = ts.defragment_storage(storage_path)
    assert [(m.model, m.rewritten) for m in untouched.models] == [("m", False), ("other", False)]
    assert "no recorded execution order" in untouched.models[0].reason
    assert untouched.rewritten == [] and untouched.failed == []

    inode_before = data_path(storage_path, "m").stat().st_ino
    order = list(reversed(names))
    ts.record_execution_order(storage_path, "m", order)
    assert ts.read_execution_order(storage_path, "m") == order
    report = ts.defragment_storage(storage_path, model="m")
    [entry] = report.models
    assert entry.rewritten and entry.model == "m" and report.rewritten == ["m"]
    assert entry.bytes_after == entry.bytes_before  # the format has no dead space to drop
    assert "rewritten" in str(report)
    assert data_path(storage_path, "m").stat().st_ino != inode_before

    with ts.open_model(storage_path, "m") as model:
        assert model.block_names() == order
        assert model.fingerprint == saved.fingerprint
        for name, tensor in expected.items():
            assert_bitwise_equal(model.read(name), tensor, name)
        for block in order:
            for name, tensor in model.read_block(block).items():
                assert_bitwise_equal(tensor, expected[name], f"{name} (block)")
    assert ts.verify_storage_integrity(storage_path).ok
    assert ts.read_execution_order(storage_path, "m") == order  # kept with the rewritten model

    again = ts.defragment_storage(storage_path, model="m")
    assert not again.models[0].rewritten and "already" in again.models[0].reason


def test_partial_order_puts_unnamed_blocks_last(storage_path):
    blocks = layered_blocks(4)
    ts.write_model(storage_path, blocks, model_id="m")
    ts.record_execution_order(storage_path, "m", ["layer2", "layer0"])
    assert ts.defragment_storage(storage_path).models[0].rewritten
    with ts.open_model(storage_path, "m") as model:
        assert model.block_names() == ["layer2", "layer0", "layer1", "layer3"]


def test_defragment_does_not_launder_corruption(storage_path):
    blocks = layered_blocks(3)
    ts.write_model(storage_path, blocks, model_id="m", chunk_size=CHUNK)
    chunk = [c for c in chunk_map(storage_path, "m") if c["tensor"] == "layer1.weight"][0]
    flip_bit(data_path(storage_path, "m"), chunk["offset"] + 5)
    ts.record_execution_order(storage_path, "m", ["layer2", "layer1", "layer0"])
    report = ts.defragment_storage(storage_path)
    assert report.failed == ["m"] and not report.models[0].rewritten
    assert "FAILED" in str(report)
    with ts.open_model(storage_path, "m") as model:
        assert model.block_names() == ["layer0", "layer1", "layer2"]  # untouched
    verify = ts.verify_storage_integrity(storage_path)
    assert [(b.tensor, b.chunk) for b in verify.bad_chunks] == [("layer1.weight", 0)]


def test_record_execution_order_validates_names(storage_path):
    ts.write_model(storage_path, layered_blocks(2), model_id="m")
    with pytest.raises(ts.ConfigError, match="nope"):
        ts.record_execution_order(storage_path, "m", ["layer0", "nope"])
    with pytest.raises(ts.ConfigError, match="twice"):
        ts.record_execution_order(storage_path, "m", ["layer0", "layer0"])
    with pytest.raises(ts.ConfigError):
        ts.record_execution_order(storage_path, "m", "layer0")
    with pytest.raises(ts.ConfigError):
        ts.read_execution_order(storage_path, "../m")
    assert ts.read_execution_order(storage_path, "m") is None
    # A malformed sidecar is ignored, never an error.
    (storage_path / "models" / "m" / "execution_order").write_text("layer0\nlayer0\n")
    assert ts.read_execution_order(storage_path, "m") is None
    assert not ts.defragment_storage(storage_path).models[0].rewritten


def test_record_execution_order_of_missing_model(storage_path):
    ts.write_model(storage_path, layered_blocks(1), model_id="m")
    with pytest.raises(ts.IoError) as info:
        ts.record_execution_order(storage_path, "absent", ["layer0"])
    assert "absent" in str(info.value)
