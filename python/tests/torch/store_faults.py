"""What the offload tests share to look inside an offloaded model and to damage its store on purpose."""

from __future__ import annotations

import json
import pathlib

from tensorstream.torch.offload import STATE_ATTR


def state_of(model):
    """The OffloadState TensorStream attached to `model`."""
    return model.__dict__[STATE_ATTR]


def flip_bit(path, offset):
    """Flips the lowest bit of the byte at `offset` of `path`."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 1]))


def chunk_offsets(storage, model_id, tensor):
    """File offsets of a tensor's chunks, from the manifest (32-byte header, then JSON; docs/format.md)."""
    raw = pathlib.Path(storage, "models", model_id, "manifest").read_bytes()
    for block in json.loads(raw[32:])["blocks"]:
        for record in block["tensors"]:
            if record["name"] == tensor:
                return [chunk["offset"] for chunk in record["chunks"]]
    raise KeyError(tensor)
