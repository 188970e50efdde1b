"""Errors: each class subclasses the documented builtin and carries its context; the engine's errors arrive as these
classes with the format rule, path, errno, model, tensor and chunk they are about."""

from __future__ import annotations

import errno

import pytest
import torch

import tensorstream as ts
from tensorstream import _core
from conftest import chunk_map, data_path, flip_bit, random_tensor


@pytest.mark.parametrize("cls, builtin", [
    (ts.IoError, OSError),
    (ts.FormatError, ValueError),
    (ts.CorruptionError, OSError),
    (ts.ConfigError, ValueError),
    (ts.CudaError, RuntimeError),
])
def test_error_classes_subclass_documented_builtins(cls, builtin):
    assert issubclass(cls, ts.TensorStreamError)
    assert issubclass(cls, builtin)
    assert issubclass(ts.TensorStreamError, Exception)


def test_python_side_constructors():
    io = ts.IoError(errno.ENOSPC, "write failed for '/x' (ENOSPC)", "/x")
    assert (io.errno, io.filename, io.path) == (errno.ENOSPC, "/x", "/x") and "ENOSPC" in str(io)
    fmt = ts.FormatError("bad", rule="manifest.magic", path="/m")
    assert (fmt.rule, fmt.path, str(fmt)) == ("manifest.magic", "/m", "bad")
    bad = ts.CorruptionError("corrupt", path="/d", model="m", tensor="t", chunk=3, offset=4096)
    assert (bad.model, bad.tensor, bad.chunk, bad.offset, str(bad)) == ("m", "t", 3, 4096, "corrupt")
    assert ts.ConfigError("x", field="chunk_size").field == "chunk_size"
    assert ts.CudaError("oops", code=2).code == 2


def test_engine_errors_arrive_as_tensorstream_classes():
    # The extension translates C++ exceptions into tensorstream.errors classes. (A translator that cannot convert
    # std::string fields, e.g. without <nanobind/stl/string.h>, turns every one into RuntimeError('std::bad_cast').)
    with pytest.raises(ts.ConfigError) as info:
        _core.dtype_size("float128")
    assert info.value.field == "dtype" and "float128" in str(info.value)


def test_io_error_has_errno_and_filename(tmp_path):
    storage = tmp_path / "store"
    ts.write_model(storage, {"b": {"w": torch.ones(2)}}, model_id="m")
    with pytest.raises(ts.IoError) as info:
        ts.open_model(storage, "missing")
    error = info.value
    assert error.errno == errno.ENOENT
    assert error.filename == str(storage / "models" / "missing") == error.path  # the missing model's directory
    assert "missing" in str(error) and "ENOENT" in str(error)
    with pytest.raises(OSError):  # catchable as the builtin
        ts.open_model(tmp_path / "no-storage", "m")


def test_config_error_names_field(tmp_path):
    with pytest.raises(ts.ConfigError) as info:
        ts.write_model(tmp_path / "s", {"b": {"w": torch.ones(2)}}, model_id="m", chunk_size=1000)
    assert info.value.field == "chunk_size" and "1000" in str(info.value)
    with pytest.raises(ValueError):
        ts.write_model(tmp_path / "s", {"b": {"w": torch.ones(2)}}, model_id="m", compression_level=10)


def corrupt_file(path, offset, xor=0xFF):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= xor
    path.write_bytes(bytes(raw))


@pytest.fixture
def model_dir(tmp_path):
    storage = tmp_path / "store"
    ts.write_model(storage, {"b": {"w": random_tensor((3000,), torch.float32)}}, model_id="m")
    return storage, storage / "models" / "m"


@pytest.mark.parametrize("damage, rule", [
    (lambda d: corrupt_file(d / "manifest", 0), "manifest.magic"),
    (lambda d: corrupt_file(d / "manifest", 8, 0x02), "manifest.version"),
    (lambda d: corrupt_file(d / "manifest", 12, 0x01), "manifest.flags"),
    (lambda d: corrupt_file(d / "manifest", 40, 0x01), "manifest.checksum"),
    (lambda d: (d / "manifest").write_bytes((d / "manifest").read_bytes() + b" "), "manifest.json_length"),
    (lambda d: (d / "manifest").write_bytes((d / "manifest").read_bytes()[:20]), "manifest.size"),
    (lambda d: (d / "data").write_bytes((d / "data").read_bytes()[:-1]), "data.size"),
    (lambda d: (d / "data").write_bytes((d / "data").read_bytes() + b"\0" * 4096), "data.size"),
])
def test_format_errors_carry_rule_and_path(model_dir, damage, rule):
    storage, directory = model_dir
    damage(directory)
    with pytest.raises(ts.FormatError) as info:
        ts.open_model(storage, "m")
    error = info.value
    assert error.rule == rule
    assert error.path.startswith(str(directory))
    assert rule in str(error)
    assert isinstance(error, ValueError)
    report = ts.verify_storage_integrity(storage)
    assert not report.ok and rule in report.models[0].error


def test_truncated_data_file_is_data_size(model_dir):
    storage, directory = model_dir
    data = directory / "data"
    data.write_bytes(data.read_bytes()[:4096])
    with pytest.raises(ts.FormatError) as info:
        ts.open_model(storage, "m")
    assert info.value.rule == "data.size" and "data file" in str(info.value)
    # The path is the model's manifest (whose data_size disagrees with the file), not the data file itself.
    assert info.value.path.startswith(str(directory))


@pytest.mark.parametrize("damage, rule", [
    (lambda s: corrupt_file(s, 0), "store.magic"),
    (lambda s: corrupt_file(s, 8, 0x04), "store.version"),
    (lambda s: corrupt_file(s, 20, 0x01), "store.checksum"),
    (lambda s: s.write_bytes(s.read_bytes()[:39]), "store.size"),
])
def test_corrupt_store_file(model_dir, damage, rule):
    storage, _ = model_dir
    damage(storage / "STORE")
    with pytest.raises(ts.FormatError) as info:
        ts.Storage(storage)
    assert info.value.rule == rule and info.value.path == str(storage / "STORE")
    with pytest.raises(ts.FormatError):
        ts.verify_storage_integrity(storage)


def test_corruption_error_names_model_tensor_chunk(model_dir):
    storage, _ = model_dir
    chunk = chunk_map(storage, "m")[0]
    flip_bit(data_path(storage, "m"), chunk["offset"] + 1000)
    with ts.open_model(storage, "m") as model:
        with pytest.raises(ts.CorruptionError) as info:
            model.read("w")
        error = info.value
        assert (error.model, error.tensor, error.chunk, error.offset) == ("m", "w", 0, chunk["offset"])
        assert error.path == str(data_path(storage, "m"))
        assert "'m'" in str(error) and "'w'" in str(error) and "checksum" in str(error)
        assert isinstance(error, OSError)
        # Opting out of verification returns the stored bytes as they are (the caller asked for that).
        assert model.read("w", verify_checksums=False).numel() == 3000


def test_errors_cross_threads(tmp_path):
    # Errors raised while the GIL is released (engine worker paths) still arrive typed.
    import threading

    storage = tmp_path / "store"
    ts.write_model(storage, {"b": {"w": torch.ones(10)}}, model_id="m")
    caught = []

    def worker():
        try:
            ts.open_model(storage, "absent")
        except Exception as error:  # noqa: BLE001 - checked below
            caught.append(error)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(caught) == 4
    assert all(isinstance(e, ts.IoError) and e.errno == errno.ENOENT for e in caught), caught


def test_io_errors_also_subclass_the_matching_builtin(tmp_path):
    import tensorstream

    with pytest.raises(FileNotFoundError) as caught:
        tensorstream.open_model(tmp_path / "no-such-storage", "m")
    assert isinstance(caught.value, tensorstream.IoError)
    assert caught.value.errno == errno.ENOENT
