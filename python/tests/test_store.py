"""Writing and reading models: every dtype bit for bit, odd shapes, chunking, compression, block reads, mapping,
content-addressed dedup, replacement and argument errors."""

from __future__ import annotations

import errno
import os
import re

import pytest
import torch

import tensorstream as ts
from conftest import (FORMAT_DTYPES, as_bytes, assert_bitwise_equal, chunk_map, compressible_bf16, data_path,
                      random_tensor, read_manifest)


def mapped_ranges(path) -> list:
    """Address ranges of the mappings of ``path`` in this process (/proc/self/maps)."""
    real = os.path.realpath(path)
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == real:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    return ranges


# ---- dtypes and shapes -------------------------------------------------------------------------------------------


def test_format_dtypes_are_torch_dtypes():
    for name in FORMAT_DTYPES:
        dtype = getattr(torch, name)
        assert isinstance(dtype, torch.dtype) and str(dtype) == f"torch.{name}"
    assert torch.chalf == torch.complex32


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("compression_level", [0, 5])
def test_every_dtype_round_trips_bitwise(storage_path, compression_level):
    blocks = {}
    for i, name in enumerate(FORMAT_DTYPES):
        dtype = getattr(torch, name)
        blocks[f"block_{name}"] = {
            f"{name}.matrix": random_tensor((37, 11), dtype, seed=i),
            f"{name}.scalar": random_tensor((), dtype, seed=100 + i),
            f"{name}.empty": torch.empty((0, 5), dtype=dtype),
        }
    result = ts.write_model(storage_path, blocks, model_id="dtypes", compression_level=compression_level)
    assert result.outcome == "published"
    with ts.open_model(storage_path, "dtypes") as model:
        assert model.block_names() == list(blocks)
        assert model.tensor_names() == [n for tensors in blocks.values() for n in tensors]
        for block_name, tensors in blocks.items():
            from_block = model.read_block(block_name)
            assert list(from_block) == list(tensors)
            for name, expected in tensors.items():
                assert model.info(name)["dtype"] == str(expected.dtype).removeprefix("torch.")
                assert_bitwise_equal(model.read(name), expected, name)
                assert_bitwise_equal(from_block[name], expected, f"{name} (read_block)")
                if compression_level == 0:
                    assert_bitwise_equal(model.map(name), expected, f"{name} (map)")


def test_scalars_and_zero_size_tensors(storage_path):
    blocks = {
        "only_empty": {"e0": torch.empty(0), "e1": torch.empty((3, 0, 2), dtype=torch.float16)},
        "mixed": {"s": torch.tensor(-0.0), "e": torch.empty((0,), dtype=torch.int64), "v": torch.arange(5)},
    }
    result = ts.write_model(storage_path, blocks, model_id="odd")
    assert result.raw_bytes == 4 + 5 * 8
    with ts.open_model(storage_path, "odd") as model:
        for tensors in blocks.values():
            for name, expected in tensors.items():
                got = model.read(name)
                assert got.shape == expected.shape
                assert_bitwise_equal(got, expected, name)
                assert_bitwise_equal(model.map(name), expected, name)
        assert model.read("s").dim() == 0
        assert torch.signbit(model.read("s")).item()  # -0.0 kept its sign bit
        assert model.info("e0")["chunks"] == 0
        block = model.read_block("only_empty")
        assert block["e1"].shape == (3, 0, 2)
    assert ts.verify_storage_integrity(storage_path).ok


def test_tensor_spanning_many_chunks(storage_path):
    chunk_size = 4096
    nbytes = 100 * 1024 + 123  # 26 chunks, the last one short
    tensor = random_tensor((nbytes,), torch.uint8, seed=7)
    ts.write_model(storage_path, {"b": {"head": torch.arange(3, dtype=torch.int16), "big": tensor}},
                   model_id="chunks", chunk_size=chunk_size)
    chunks = [c for c in chunk_map(storage_path, "chunks") if c["tensor"] == "big"]
    assert len(chunks) == -(-nbytes // chunk_size) == 26
    assert [c["size"] for c in chunks] == [chunk_size] * 25 + [nbytes - 25 * chunk_size]
    assert chunks[0]["offset"] % 256 == 0
    with ts.open_model(storage_path, "chunks") as model:
        assert model.chunk_size == chunk_size
        assert model.info("big")["chunks"] == 26
        assert_bitwise_equal(model.read("big"), tensor)
        assert_bitwise_equal(model.read_block("b")["big"], tensor)


def test_non_contiguous_conjugate_and_view_inputs(storage_path):
    base = random_tensor((8, 6), torch.float32, seed=3)
    complex_values = random_tensor((5,), torch.complex64, seed=4).nan_to_num()
    blocks = {"b": {
        "transposed": base.t(),                      # non-contiguous
        "sliced": base[2:5, 1:4],                    # view with a storage offset
        "conj": complex_values.conj(),               # lazy conjugate bit
        "neg": torch.tensor([1.0, -2.0]).neg().neg(),
        "param": torch.nn.Parameter(torch.ones(3)),  # requires grad
    }}
    ts.write_model(storage_path, blocks, model_id="views")
    with ts.open_model(storage_path, "views") as model:
        assert_bitwise_equal(model.read("transposed"), base.t().contiguous())
        assert_bitwise_equal(model.read("sliced"), base[2:5, 1:4].contiguous())
        assert_bitwise_equal(model.read("conj"), complex_values.conj().resolve_conj())
        assert_bitwise_equal(model.read("param"), torch.ones(3))


# ---- compression -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", range(10))
def test_compression_levels_round_trip(storage_path, level):
    compressible = compressible_bf16(40_000, seed=level)  # 80 KB: 20 chunks of 4 KiB
    incompressible = random_tensor((30_000,), torch.uint8, seed=50 + level)
    floats = random_tensor((3000,), torch.float32, seed=60 + level)  # random bits, NaNs included
    blocks = {"weights": {"compressible": compressible, "incompressible": incompressible, "floats": floats}}
    result = ts.write_model(storage_path, blocks, model_id=f"level{level}", chunk_size=4096,
                            compression_level=level)
    codecs = {c["codec"] for c in chunk_map(storage_path, f"level{level}") if c["tensor"] == "compressible"}
    # Floats take the exponent codec (docs/format.md §5); from level 6 grouped zstd may win a chunk.
    assert codecs == {"raw"} if level == 0 else (codecs == {"exponent"} if level <= 5 else codecs <= {"exponent", "zstd"})
    int16 = {c["codec"] for c in chunk_map(storage_path, f"level{level}") if c["tensor"] == "incompressible"}
    assert int16 == {"raw"}
    with ts.open_model(storage_path, f"level{level}") as model:
        for name, expected in blocks["weights"].items():
            assert_bitwise_equal(model.read(name), expected, name)
            assert_bitwise_equal(model.read_block("weights")[name], expected, f"{name} (block)")
        info = model.info("compressible")
        incompressible_info = model.info("incompressible")
        # Random bytes never shrink: those chunks are stored raw, so the tensor can still be mapped.
        assert incompressible_info["stored_bytes"] == incompressible.numel()
        assert incompressible_info["raw_file_offset"] is not None
        assert_bitwise_equal(model.map("incompressible"), incompressible)
        if level == 0:
            assert info["stored_bytes"] == info["nbytes"]
            assert result.stored_bytes >= result.raw_bytes
        else:
            assert info["stored_bytes"] < info["nbytes"]
            assert info["compressed"] and info["raw_file_offset"] is None
        if level == 5:
            assert info["stored_bytes"] < 0.9 * info["nbytes"]
    assert ts.verify_storage_integrity(storage_path, model=f"level{level}").ok


def test_map_refuses_compressed_tensor(storage_path):
    ts.write_model(storage_path, {"b": {"packed": compressible_bf16(10_000)}}, model_id="m", compression_level=5)
    with ts.open_model(storage_path, "m") as model:
        with pytest.raises(ts.ConfigError, match="packed") as info:
            model.map("packed")
        assert "read()" in str(info.value)


# ---- block reads and mapping -------------------------------------------------------------------------------------


def test_read_block_returns_views_of_one_slot(storage_path):
    tensors = {"a": random_tensor((300,), torch.float32, seed=1), "b": random_tensor((7,), torch.int8, seed=2),
               "c": random_tensor((5, 9), torch.float64, seed=3)}
    ts.write_model(storage_path, {"layer": tensors}, model_id="m")
    with ts.open_model(storage_path, "m") as model:
        block = model.read_block("layer")
        base = block["a"].untyped_storage().data_ptr()
        for name, expected in tensors.items():
            got = block[name]
            assert_bitwise_equal(got, expected, name)
            assert got.untyped_storage().data_ptr() == base  # one buffer
            offset = got.data_ptr() - base
            assert offset == model.info(name)["slot_offset"] and offset % 256 == 0
        assert model.block_info("layer")["tensors"] == list(tensors)
        with pytest.raises(KeyError, match="nope"):
            model.read_block("nope")


def test_map_is_zero_copy(storage_path):
    weight = random_tensor((64, 100), torch.bfloat16, seed=9)
    ts.write_model(storage_path, {"b": {"pad": torch.ones(3), "weight": weight}}, model_id="m")
    with ts.open_model(storage_path, "m") as model:
        mapped = model.map("weight")
        assert_bitwise_equal(mapped, weight)
        ranges = mapped_ranges(data_path(storage_path, "m"))
        assert ranges, "the data file is not mapped"
        start, end = mapped.data_ptr(), mapped.data_ptr() + mapped.numel() * mapped.element_size()
        assert any(lo <= start and end <= hi for lo, hi in ranges)
        assert model.info("weight")["raw_file_offset"] % 256 == 0
        # Copy-on-write: the mapped tensor may be changed in memory; the file is not.
        mapped.zero_()
        assert_bitwise_equal(model.read("weight"), weight)
    del mapped
    assert ts.verify_storage_integrity(storage_path).ok


def test_read_all_and_index(storage_path):
    blocks = {"b0": {"x": torch.arange(4)}, "b1": {"y": torch.ones(2, 2), "z": torch.zeros(1)}}
    ts.write_model(storage_path, blocks, model_id="m", metadata={"config": '{"hidden": 4}', "k": ""})
    storage = ts.Storage(storage_path, create=False)
    assert storage.models() == ["m"] and "m" in storage and "other" not in storage and "../m" not in storage
    assert len(storage.store_id) == 32
    with storage.open("m") as model:
        assert model.metadata == {"config": '{"hidden": 4}', "k": ""}
        assert model.block_tensor_names("b1") == ["y", "z"]
        everything = model.read_all()
        assert list(everything) == ["x", "y", "z"]
        for tensors in blocks.values():
            for name, expected in tensors.items():
                assert_bitwise_equal(everything[name], expected, name)
        info = model.info("y")
        assert info["shape"] == [2, 2] and info["nbytes"] == 16 and info["block_name"] == "b1"
        with pytest.raises(KeyError, match="'nope'"):
            model.read("nope")
    with pytest.raises(ValueError, match="closed"):
        model.read("x")


def test_gpu_tensors_are_copied_to_host(storage_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    weight = random_tensor((1000,), torch.float16, seed=5)
    ts.write_model(storage_path, {"b": {"w": weight.cuda()}}, model_id="gpu")
    with ts.open_model(storage_path, "gpu") as model:
        assert_bitwise_equal(model.read("w"), weight)


# ---- dedup, fingerprints, replacement ----------------------------------------------------------------------------


class CountingCore:
    """Stands in for tensorstream._core inside tensorstream.store and counts the tensors handed to writers."""

    def __init__(self, core):
        self._core = core
        self.tensors_written = 0
        spy = self

        class StoreWriter:
            def __init__(self, *args, **kwargs):
                self._writer = core.StoreWriter(*args, **kwargs)

            def add_tensor(self, *args, **kwargs):
                spy.tensors_written += 1
                return self._writer.add_tensor(*args, **kwargs)

            def __getattr__(self, name):
                return getattr(self._writer, name)

        self.StoreWriter = StoreWriter

    def __getattr__(self, name):
        return getattr(self._core, name)


def test_content_addressed_dedup_writes_once(storage_path, monkeypatch):
    import tensorstream.store

    spy = CountingCore(tensorstream.store._core)
    monkeypatch.setattr(tensorstream.store, "_core", spy)
    blocks = {"b0": {"w": random_tensor((5000,), torch.float32, seed=1)}, "b1": {"v": torch.arange(10)}}
    first = ts.write_model(storage_path, blocks)
    assert spy.tensors_written == 2
    assert first.outcome == "published" and first.model_id == "fp-" + first.fingerprint
    assert re.fullmatch(r"[0-9a-f]{32}", first.fingerprint)
    assert first.fingerprint == ts.fingerprint(blocks)
    data = data_path(storage_path, first.model_id)
    before = os.stat(data)
    again = ts.write_model(storage_path, blocks, chunk_size=8192, compression_level=5)
    assert again.outcome == "already_existed"
    assert (again.model_id, again.fingerprint) == (first.model_id, first.fingerprint)
    assert (again.raw_bytes, again.stored_bytes) == (first.raw_bytes, first.stored_bytes)
    assert spy.tensors_written == 2  # nothing was written the second time, not even to a discarded temp file
    after = os.stat(data)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert os.listdir(storage_path / "tmp") == []  # the discarded writer left nothing behind
    assert ts.Storage(storage_path).models() == [first.model_id]


def test_fingerprint_ignores_chunking_compression_and_store(tmp_path):
    blocks = {"a": {"w": compressible_bf16(20_000, seed=3)}, "b": {"u": random_tensor((999,), torch.uint8)}}
    r1 = ts.write_model(tmp_path / "s1", blocks, model_id="m", chunk_size=4096)
    r2 = ts.write_model(tmp_path / "s2", blocks, model_id="m", chunk_size=1 << 20, compression_level=9)
    assert r1.fingerprint == r2.fingerprint == ts.fingerprint(blocks)
    assert ts.open_model(tmp_path / "s1", "m").chunk_size == 4096
    # Block order does not enter the fingerprint; names, values, dtypes and shapes do.
    assert ts.fingerprint({"b": blocks["b"], "a": blocks["a"]}) == r1.fingerprint
    changed = {"a": {"w": blocks["a"]["w"].clone()}, "b": blocks["b"]}
    changed["a"]["w"][123] += 1
    assert ts.fingerprint(changed) != r1.fingerprint
    assert ts.fingerprint({"a": {"w2": blocks["a"]["w"]}, "b": blocks["b"]}) != r1.fingerprint
    assert ts.fingerprint({"a": {"w": blocks["a"]["w"].view(torch.int16)}, "b": blocks["b"]}) != r1.fingerprint
    assert ts.fingerprint({"a": {"w": blocks["a"]["w"].view(100, 200)}, "b": blocks["b"]}) != r1.fingerprint


def test_named_model_keep_and_replace(storage_path):
    old = {"b": {"w": torch.zeros(100)}}
    new = {"b": {"w": torch.ones(100)}, "c": {"x": torch.arange(3)}}
    assert ts.write_model(storage_path, old, model_id="m").outcome == "published"
    before = os.stat(data_path(storage_path, "m"))
    kept = ts.write_model(storage_path, new, model_id="m")
    assert kept.outcome == "already_existed" and kept.fingerprint == ts.fingerprint(old)
    after = os.stat(data_path(storage_path, "m"))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    with ts.open_model(storage_path, "m") as model:
        assert_bitwise_equal(model.read("w"), old["b"]["w"])
    replaced = ts.write_model(storage_path, new, model_id="m", replace=True)
    assert replaced.outcome == "replaced" and replaced.fingerprint == ts.fingerprint(new)
    with ts.open_model(storage_path, "m") as model:
        assert model.block_names() == ["b", "c"]
        assert_bitwise_equal(model.read("w"), new["b"]["w"])
    assert ts.verify_storage_integrity(storage_path).ok
    storage = ts.Storage(storage_path)
    storage.remove("m")
    assert storage.models() == [] and "m" not in storage


def test_remove_missing_model(storage_path):
    storage = ts.Storage(storage_path)
    with pytest.raises(ts.IoError) as info:
        storage.remove("m")
    assert info.value.errno == errno.ENOENT


def test_open_reader_survives_replacement(storage_path):
    old = random_tensor((2048,), torch.float32, seed=1)
    ts.write_model(storage_path, {"b": {"w": old}}, model_id="m")
    with ts.open_model(storage_path, "m") as model:
        ts.write_model(storage_path, {"b": {"w": torch.zeros(10)}}, model_id="m", replace=True)
        assert_bitwise_equal(model.read("w"), old)
        assert_bitwise_equal(model.map("w"), old)  # maps the file this reader validated, not the new one


# ---- streaming form ----------------------------------------------------------------------------------------------


def test_blocks_streamed_one_at_a_time(storage_path):
    """An iterable of (name, tensors) pairs is written block by block: each block is dropped by the writer before
    the next one is produced, so a generator that loads blocks lazily holds one at a time."""
    import weakref

    values = {f"layer{i}": random_tensor((3000 + i,), torch.float32, seed=i) for i in range(4)}
    produced, alive_before = [], []

    def blocks():
        previous = None
        for name, value in values.items():
            alive_before.append(previous is not None and previous() is not None)
            tensor = value.clone()  # a fresh tensor only this generator and the writer know
            previous = weakref.ref(tensor)
            produced.append(name)
            yield name, {f"{name}.w": tensor}
            del tensor

    result = ts.write_model(storage_path, blocks(), model_id="streamed")
    assert produced == list(values) and not any(alive_before)
    mapping = {name: {f"{name}.w": value} for name, value in values.items()}
    assert result.outcome == "published" and result.fingerprint == ts.fingerprint(mapping)
    with ts.open_model(storage_path, "streamed") as model:
        assert model.block_names() == list(values)
        for name, value in values.items():
            assert_bitwise_equal(model.read(f"{name}.w"), value)
    # Tensors may stream too: (name, tensor) pairs.
    pairs = ((name, ((f"{name}.w", value) for _ in (0,))) for name, value in values.items())
    assert ts.write_model(storage_path, pairs, model_id="pairs").fingerprint == result.fingerprint
    assert ts.write_model(storage_path, [("a", [("x", torch.ones(3))])], model_id="lists").written


def test_stream_of_an_existing_model_is_not_read(storage_path):
    ts.write_model(storage_path, {"b": {"w": torch.ones(4)}}, model_id="m")
    started = []

    def blocks():
        started.append(True)
        yield "b", {"w": torch.zeros(4)}

    assert ts.write_model(storage_path, blocks(), model_id="m").outcome == "already_existed"
    assert not started


def test_stream_needs_a_model_id_and_unique_blocks(storage_path):
    with pytest.raises(ts.ConfigError, match="read only once") as info:
        ts.write_model(storage_path, iter([("b", {"w": torch.ones(4)})]))
    assert info.value.field == "model_id"
    with pytest.raises(ts.ConfigError, match="appears twice"):
        ts.write_model(storage_path, [("b", {"w": torch.ones(4)}), ("b", {"v": torch.ones(4)})], model_id="m")
    for bad in ([("b",)], [("b", 3)], ["b"], 7):
        with pytest.raises(ts.ConfigError):
            ts.write_model(storage_path, bad, model_id="m")
    assert ts.Storage(storage_path).models() == []
    assert os.listdir(storage_path / "tmp") == []


@pytest.mark.parametrize("compression_level", [0, 5])
def test_a_tensor_with_its_own_chunk_size(storage_path, compression_level):
    table = torch.randn(1000, 384)  # rows of 1536 bytes; 40 rows per 61440-byte chunk
    other = torch.randn(300, 300)
    blocks = {"embed": {"table": table}, "layer": {"w": other}}
    result = ts.write_model(storage_path, blocks, model_id="own", chunk_size=1 << 20,
                            compression_level=compression_level, tensor_chunk_sizes={"table": 61440})
    assert result.fingerprint == ts.fingerprint(blocks)  # chunking is not content
    sizes = [c["size"] for c in chunk_map(storage_path, "own") if c["tensor"] == "table"]
    if compression_level == 0:
        assert sizes == [61440] * 25
    assert len(sizes) == 25
    manifest = read_manifest(storage_path, "own")
    assert manifest["blocks"][0]["tensors"][0]["chunk_size"] == 61440
    assert "chunk_size" not in manifest["blocks"][1]["tensors"][0]  # the model's: not written
    with ts.open_model(storage_path, "own") as model:
        assert model.info("table")["chunk_size"] == 61440 and model.info("table")["chunks"] == 25
        assert model.info("w")["chunk_size"] == 1 << 20 and model.info("w")["chunks"] == 1
        assert_bitwise_equal(model.read("table"), table)
        assert_bitwise_equal(model.read("w"), other)
        assert_bitwise_equal(model.read_rows("table", [0, 39, 40, 999]), table[[0, 39, 40, 999]])
    assert ts.verify_storage_integrity(storage_path).ok  # every chunk checked and decoded, fingerprint included


# ---- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"model_id": "../x"}, "model_id"),
    ({"model_id": ".hidden"}, "model_id"),
    ({"model_id": "a/b"}, "model_id"),
    ({"model_id": ""}, "model_id"),
    ({"model_id": "x" * 129}, "model_id"),
    ({"chunk_size": 1000}, "chunk_size"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": (64 << 20) + 4096}, "chunk_size"),
    ({"compression_level": 10}, "compression_level"),
    ({"compression_level": -1}, "compression_level"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"tensor_chunk_sizes": {"w": 1000}}, "chunk_size"),
    ({"tensor_chunk_sizes": {"w": 8 << 20}}, "chunk_size"),  # above the model's 4 MiB
    ({"tensor_chunk_sizes": {"nope": 4096}}, "tensor_chunk_sizes"),
    ({"tensor_chunk_sizes": {"w": "4096"}}, "tensor_chunk_sizes"),
    ({"tensor_chunk_sizes": [("w", 4096)]}, "tensor_chunk_sizes"),
])
def test_bad_arguments_raise_config_error(storage_path, kwargs, field):
    blocks = {"b": {"w": torch.ones(4)}}
    with pytest.raises(ts.ConfigError) as info:
        ts.write_model(storage_path, blocks, **kwargs)
    assert isinstance(info.value, ValueError)
    assert info.value.field == field
    if field in ("model_id", "metadata"):  # checked before anything touches the disk
        assert not storage_path.exists()
    else:
        assert ts.Storage(storage_path).models() == []
        assert os.listdir(storage_path / "tmp") == []


@pytest.mark.parametrize("blocks, match", [
    ({"b": {"w": [1, 2, 3]}}, "torch.Tensor"),
    ({"b": {}}, "no tensors"),
    ({"": {"w": torch.ones(1)}}, "block name"),
    ({"b": {"": torch.ones(1)}}, "tensor name"),
    ({"b": {"w": torch.ones(1)}, "c": {"w": torch.ones(1)}}, "twice"),
    ({"b": {"w": torch.ones(2).to_sparse()}}, "layout"),
    ({"b": {"w": torch.empty(3, device="meta")}}, "meta"),
])
def test_bad_blocks_raise_config_error_and_publish_nothing(storage_path, blocks, match):
    for model_id in ("named", None):
        with pytest.raises(ts.ConfigError, match=match):
            ts.write_model(storage_path, blocks, model_id=model_id)
    assert ts.Storage(storage_path).models() == []
    assert os.listdir(storage_path / "tmp") == []


def test_failed_replace_keeps_existing_model(storage_path):
    good = {"b": {"w": torch.arange(10)}}
    ts.write_model(storage_path, good, model_id="m")
    with pytest.raises(ts.ConfigError):
        ts.write_model(storage_path, {"b": {"w": torch.ones(3)}, "c": {"w": torch.ones(3)}}, model_id="m",
                       replace=True)
    with ts.open_model(storage_path, "m") as model:
        assert_bitwise_equal(model.read("w"), good["b"]["w"])


def test_missing_model_and_storage(storage_path, tmp_path):
    ts.write_model(storage_path, {"b": {"w": torch.ones(1)}}, model_id="present")
    with pytest.raises(ts.IoError) as info:
        ts.open_model(storage_path, "absent")
    assert info.value.errno == errno.ENOENT
    assert isinstance(info.value, FileNotFoundError) and info.value.filename.endswith("absent")
    assert "absent" in str(info.value)
    with pytest.raises(ts.IoError) as info:
        ts.open_model(tmp_path / "nowhere", "present")
    assert info.value.errno == errno.ENOENT
    assert not (tmp_path / "nowhere").exists()  # opening for reading creates nothing
    with pytest.raises(ts.ConfigError):
        ts.open_model(storage_path, "../present")


def test_save_result_is_frozen(storage_path):
    result = ts.write_model(storage_path, {"b": {"w": torch.ones(1)}}, model_id="m")
    with pytest.raises(Exception):
        result.outcome = "x"  # type: ignore[misc]
    assert result.written and result.raw_bytes == 4 and result.stored_bytes == 4096
    assert read_manifest(storage_path, "m")["fingerprint"] == result.fingerprint
    assert as_bytes(torch.ones(1)).numel() == 4


def test_concurrent_identical_writes_store_once(storage_path):
    import threading

    blocks = {f"b{i}": {f"w{i}": random_tensor((20_000,), torch.float32, seed=i)} for i in range(4)}
    outcomes, errors = [], []

    def save():
        try:
            outcomes.append(ts.write_model(storage_path, blocks, chunk_size=4096).outcome)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=save) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(outcomes) == ["already_existed"] * 3 + ["published"]
    assert ts.Storage(storage_path).models() == ["fp-" + ts.fingerprint(blocks)]
    assert os.listdir(storage_path / "tmp") == []
    assert ts.verify_storage_integrity(storage_path).ok


# ---- progress bar (tensorstream/progress.py) ----------------------------------------------------------------------

def test_progress_bar_shows_bytes_rate_and_tensor_when_asked(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tqdm")
    import tensorstream.progress as progress
    monkeypatch.setattr(progress, "DELAY_S", 0.0)  # a test write is quicker than the delay that hides short writes
    monkeypatch.setattr(progress, "REDRAW_S", 0.0)
    blocks = {"layers.0": {"w": torch.ones(300_000)}, "layers.1": {"v": torch.ones(200_000)}}
    ts.write_model(tmp_path, blocks, model_id="m", progress=True)
    err = capsys.readouterr().err
    assert "writing m" in err and "B/s" in err and ("2.00MB" in err or "2.00M" in err), err[-500:]
    assert "1.20M/2.00M" in err and "B/s, w]" in err, err[-800:]  # bytes of the total, rate, the tensor written


def test_progress_is_off_when_asked_or_not_on_a_terminal(tmp_path, capsys, monkeypatch):
    import tensorstream.progress as progress
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    blocks = {"b": {"w": torch.ones(1000)}}
    ts.write_model(tmp_path, blocks, model_id="a", progress=False)
    ts.write_model(tmp_path, blocks, model_id="b")  # stderr is captured here: not a terminal
    monkeypatch.setenv("TENSORSTREAM_PROGRESS", "1")
    ts.write_model(tmp_path, blocks, model_id="c", progress=False)  # the argument wins
    assert "writing" not in capsys.readouterr().err
    monkeypatch.setenv("TENSORSTREAM_PROGRESS", "0")
    assert progress.progress_enabled(None) is False
    monkeypatch.setenv("TENSORSTREAM_PROGRESS", "on")
    assert progress.progress_enabled(None) is True
    monkeypatch.setenv("TENSORSTREAM_PROGRESS", "sometimes")
    with pytest.raises(ts.ConfigError) as caught:
        progress.progress_enabled(None)
    assert caught.value.field == "TENSORSTREAM_PROGRESS"
    with pytest.raises(ts.ConfigError) as caught:
        ts.write_model(tmp_path, blocks, model_id="d", progress="yes")
    assert caught.value.field == "progress"
    with pytest.raises(ts.ConfigError) as caught:
        ts.Config(storage_path=str(tmp_path), progress="yes")
    assert caught.value.field == "progress"
