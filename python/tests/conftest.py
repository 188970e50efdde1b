"""Shared fixtures for the Python tests: temporary storage directories, deterministic tensors, bitwise comparison,
and helpers that read the on-disk layout from the manifest (docs/format.md) so tests can corrupt exact bytes.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Any, Dict, List

import pytest

torch = pytest.importorskip("torch")

# Every dtype of docs/format.md with its torch dtype (torch.chalf is complex32).
FORMAT_DTYPES = [
    "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "bfloat16",
    "float32", "float64", "complex32", "complex64", "complex128", "float8_e4m3fn", "float8_e4m3fnuz",
    "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
]


def random_tensor(shape, dtype, seed: int = 0) -> "torch.Tensor":
    """A tensor of ``dtype`` whose bytes are uniformly random (NaN payloads, -0.0, subnormals, ...).

    ``bool`` gets random 0/1 bytes: any other byte is not a valid bool in PyTorch.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = list(shape)
    numel = 1
    for d in shape:
        numel *= d
    itemsize = dtype.itemsize
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw & 1
    return raw.view(dtype).reshape(shape)


def compressible_bf16(numel: int, seed: int = 0) -> "torch.Tensor":
    """Normally distributed bf16 weights: exponent bytes repeat, so byte-grouped zstd shrinks them."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(numel, generator=gen) * 0.02).to(torch.bfloat16)


def as_bytes(tensor: "torch.Tensor") -> "torch.Tensor":
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def bitwise_equal(a: "torch.Tensor", b: "torch.Tensor") -> bool:
    """Same dtype, shape and bytes (NaN payloads and -0.0 compare bitwise)."""
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(as_bytes(a), as_bytes(b))


def assert_bitwise_equal(actual: "torch.Tensor", expected: "torch.Tensor", what: str = "") -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(as_bytes(actual), as_bytes(expected)), f"{what}: bytes differ"


def read_manifest(storage: os.PathLike, model_id: str) -> Dict[str, Any]:
    """The JSON of models/<model_id>/manifest (32-byte header, then JSON; docs/format.md §3)."""
    raw = (pathlib.Path(storage) / "models" / model_id / "manifest").read_bytes()
    magic, version, flags, length, _checksum = struct.unpack("<8sIIQQ", raw[:32])
    assert magic == b"TSMANIF\0" and version == 1 and flags == 0 and length == len(raw) - 32
    return json.loads(raw[32:])


def chunk_map(storage: os.PathLike, model_id: str) -> List[Dict[str, Any]]:
    """Every chunk of the model: block, tensor, chunk index, offset, size, codec (in file order)."""
    out = []
    for block in read_manifest(storage, model_id)["blocks"]:
        for tensor in block["tensors"]:
            for index, chunk in enumerate(tensor["chunks"]):
                out.append({"block": block["name"], "tensor": tensor["name"], "chunk": index,
                            "offset": chunk["offset"], "size": chunk["size"], "codec": chunk["codec"]})
    return out


def data_path(storage: os.PathLike, model_id: str) -> pathlib.Path:
    return pathlib.Path(storage) / "models" / model_id / "data"


def flip_bit(path: os.PathLike, offset: int, bit: int = 0) -> int:
    """Flips one bit of the byte at ``offset`` in place; returns the original byte."""
    with open(path, "r+b") as f:
        f.seek(offset)
        original = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([original ^ (1 << bit)]))
    return original


def write_byte(path: os.PathLike, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes([value]))


@pytest.fixture
def storage_path(tmp_path: pathlib.Path) -> pathlib.Path:
    """A path for a storage directory (not yet created)."""
    return tmp_path / "store"
