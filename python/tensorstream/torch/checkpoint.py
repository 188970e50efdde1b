"""Writing a store straight from a Hugging Face checkpoint directory, one block at a time.

``offload(meta_model, config, model_id="name", checkpoint="path/to/dir")`` uses this when the store does not hold
``name`` yet: the model (built on the meta device) says which blocks there are; each block's tensors are read from
the checkpoint with ``safetensors.safe_open`` when the writer reaches that block, written, and dropped, so the
process holds about one block of weights at a time, never the model.

Checkpoint layouts (what ``save_pretrained`` writes):

* a directory with ``model.safetensors.index.json`` (sharded: its ``weight_map`` maps each tensor to a shard file);
* a directory with one ``model.safetensors``;
* the path of a ``.safetensors`` file.

``pytorch_model.bin`` (pickle) checkpoints are not read: convert them to safetensors first.

Names. Hugging Face checkpoints use the model's ``state_dict()`` keys. A tensor registered under several names (tied
weights: ``lm_head.weight`` is ``model.embed_tokens.weight``) is saved once, under any one of them: every name the
model registers the tensor under is tried, in registration order. A checkpoint of the base model loaded into a model
with a head (or the other way round) differs by the model's ``base_model_prefix`` (``model.``, ``transformer.``):
each name is also tried with that prefix removed or added. Tensors of the checkpoint that the model does not use are
ignored (as ``from_pretrained`` does). A tensor the model needs and the checkpoint lacks is a ConfigError naming it,
raised before anything is written; so is a shape that differs. A value whose dtype differs from the model's is cast
to the model's dtype, as ``load_state_dict`` would. A persistent buffer the checkpoint lacks keeps the value the
model computed when it was built (``init_empty_weights()`` leaves buffers on the CPU), as with ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import ConfigError
from .partition import RESIDENT_BLOCK, Partition, ResidentTensor, qualified_names

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# safetensors refuses headers above 100 MB; a larger length means the file is not safetensors.
_MAX_HEADER_BYTES = 100 * 1000 * 1000

__all__ = ["Checkpoint", "TensorSource", "plan_blocks", "iter_blocks", "INDEX_NAME", "SINGLE_NAME"]


def _error(message: str) -> ConfigError:
    return ConfigError(message, field="checkpoint")


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """Where one tensor of the store comes from."""

    name: str                          # the model's (and the store's) tensor name
    key: Optional[str]                 # its key in the checkpoint; None: ``fallback`` is the value
    file: Optional[str]                # the safetensors file holding ``key``
    dtype: torch.dtype                 # the model's dtype: the value is cast to it
    shape: Tuple[int, ...]
    fallback: Optional[torch.Tensor] = None


class Checkpoint:
    """The tensor index of a safetensors checkpoint (file headers only; no tensor data is read here)."""

    def __init__(self, path: "str | os.PathLike[str]") -> None:
        root = os.path.abspath(os.fspath(path))
        self.path = root
        self.files: Dict[str, str] = {}  # checkpoint key -> file
        self._shapes: Dict[str, Dict[str, Tuple[int, ...]]] = {}  # file -> key -> shape (headers read on demand)
        if os.path.isfile(root):
            if not root.endswith(".safetensors"):
                raise _error(f"checkpoint {root} is not a .safetensors file (pytorch_model.bin and other pickle "
                             "checkpoints are not read: save the model with safetensors, e.g. save_pretrained)")
            self._add_file(root)
        elif os.path.isdir(root):
            index = os.path.join(root, INDEX_NAME)
            single = os.path.join(root, SINGLE_NAME)
            if os.path.isfile(index):
                self._load_index(index)
            elif os.path.isfile(single):
                self._add_file(single)
            else:
                raise _error(f"checkpoint directory {root} has neither {INDEX_NAME} nor {SINGLE_NAME} (only "
                             "safetensors checkpoints are read; pytorch_model.bin is not)")
        else:
            raise _error(f"checkpoint {root} does not exist")

    def _load_index(self, index: str) -> None:
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise _error(f"checkpoint index {index} cannot be read ({error}): expected JSON with a 'weight_map' "
                         "object") from None
        if not isinstance(weight_map, dict):
            raise _error(f"checkpoint index {index}: 'weight_map' must map tensor names to shard files")
        folder = os.path.dirname(index)
        for key, shard in weight_map.items():
            if not isinstance(key, str) or not isinstance(shard, str) or os.path.basename(shard) != shard:
                raise _error(f"checkpoint index {index}: entry {key!r} -> {shard!r} is not a tensor name mapped to a "
                             "shard file name in the same directory")
            self.files[key] = os.path.join(folder, shard)

    def _add_file(self, file: str) -> None:
        for key in self._header(file):
            self.files[key] = file

    def _header(self, file: str) -> Dict[str, Tuple[int, ...]]:
        shapes = self._shapes.get(file)
        if shapes is not None:
            return shapes
        try:
            with open(file, "rb") as f:
                head = f.read(8)
                (length,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
                if length is None or length > _MAX_HEADER_BYTES:
                    raise ValueError("no valid header length")
                header = json.loads(f.read(length))
                file_size = os.fstat(f.fileno()).st_size
            shapes = {key: tuple(int(d) for d in value["shape"]) for key, value in header.items()
                      if key != "__metadata__"}
            data_size = file_size - 8 - length
            for key, value in header.items():
                if key == "__metadata__":
                    continue
                end = int(value["data_offsets"][1])
                if end > data_size:
                    raise _error(f"checkpoint file {file} is truncated: tensor '{key}' ends at data byte {end}, the "
                                 f"file holds {max(data_size, 0)} data bytes ({file_size} bytes in all)")
        except ConfigError:
            raise
        except FileNotFoundError:
            raise _error(f"checkpoint file {file} does not exist") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise _error(f"checkpoint file {file} is not a safetensors file ({error})") from None
        self._shapes[file] = shapes
        return shapes

    def shape(self, key: str) -> Tuple[int, ...]:
        file = self.files[key]
        if not os.path.isfile(file):
            raise _error(f"checkpoint file {file}, which the index names for tensor '{key}', does not exist (a "
                         "missing shard)")
        shapes = self._header(file)
        if key not in shapes:
            raise _error(f"checkpoint index lists tensor '{key}' in {file}, which does not hold it")
        return shapes[key]

    def find(self, names: Sequence[str], prefix: str = "") -> Optional[str]:
        """The checkpoint key of the first of ``names`` found (each also tried without / with ``prefix``)."""
        for name in _candidates(names, prefix):
            if name in self.files:
                return name
        return None

    def __repr__(self) -> str:
        return f"<Checkpoint {self.path}: {len(self.files)} tensors>"


def _candidates(names: Sequence[str], prefix: str) -> List[str]:
    out: List[str] = []
    for name in names:
        out.append(name)
    if prefix:
        for name in names:
            out.append(name[len(prefix) + 1:] if name.startswith(prefix + ".") else f"{prefix}.{name}")
    return list(dict.fromkeys(out))


def plan_blocks(checkpoint: Checkpoint, model: nn.Module, partition: Partition,
                resident: List[ResidentTensor]) -> List[Tuple[str, List[TensorSource]]]:
    """Where each tensor of each block to store comes from: the streamed blocks in partition order, then
    :data:`RESIDENT_BLOCK` (when there are resident tensors). Every tensor is looked up and its shape checked before
    anything is read: a missing tensor or another shape is a ConfigError (field ``checkpoint``) naming it."""
    aliases = qualified_names(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    missing: List[str] = []

    def source(name: str, tensor: torch.Tensor, may_keep: bool) -> Optional[TensorSource]:
        names = aliases.get(id(tensor), [name])
        key = checkpoint.find(names, prefix)
        shape = tuple(tensor.shape)
        if key is None:
            if may_keep and tensor.device.type != "meta":
                return TensorSource(name, None, None, tensor.dtype, shape, fallback=tensor.detach())
            others = [n for n in _candidates(names, prefix) if n != name]
            missing.append(f"'{name}'" + (f" (nor {', '.join(repr(n) for n in others)})" if others else ""))
            return None
        stored = checkpoint.shape(key)
        if stored != shape:
            raise _error(f"tensor '{name}': the model has shape {list(shape)}, checkpoint {checkpoint.path} has "
                         f"{list(stored)} (as '{key}'): this checkpoint is not this model's")
        return TensorSource(name, key, checkpoint.files[key], tensor.dtype, shape)

    plan: List[Tuple[str, List[TensorSource]]] = []
    for block in partition.streamed:
        sources = [source(e.name, e.param, may_keep=False) for e in block.params]
        plan.append((block.name, [s for s in sources if s is not None]))
    if resident:
        sources = [source(r.name, r.tensor, may_keep=r.kind == "buffer") for r in resident]
        plan.append((RESIDENT_BLOCK, [s for s in sources if s is not None]))
    if missing:
        more = f" and {len(missing) - 1} more: {', '.join(missing[1:6])}{', ...' if len(missing) > 6 else ''}" \
            if len(missing) > 1 else ""
        raise _error(f"checkpoint {checkpoint.path} has no tensor {missing[0]}{more}; the model needs "
                     f"{'them' if len(missing) > 1 else 'it'} (is this the checkpoint of this model?)")
    return plan


def _block_tensors(sources: List[TensorSource]) -> Iterator[Tuple[str, torch.Tensor]]:
    """One block's tensors, one at a time, each file of the block opened once (and closed, unmapping it, at the end
    of the block)."""
    from safetensors import safe_open

    handles: Dict[str, object] = {}
    try:
        for src in sources:
            if src.key is None:
                yield src.name, src.fallback
                continue
            handle = handles.get(src.file)
            if handle is None:
                try:
                    handle = handles[src.file] = safe_open(src.file, framework="pt", device="cpu")
                except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
                    raise _error(f"checkpoint file {src.file} cannot be opened: {error}") from None
            tensor = handle.get_tensor(src.key)
            if tuple(tensor.shape) != src.shape:  # the header said otherwise: the file changed under us
                raise _error(f"tensor '{src.name}': checkpoint {src.file} holds shape {list(tensor.shape)} as "
                             f"'{src.key}', the model has {list(src.shape)}")
            if tensor.dtype != src.dtype:
                tensor = tensor.to(src.dtype)
            yield src.name, tensor
            del tensor
    finally:
        for handle in handles.values():
            exit_ = getattr(handle, "__exit__", None)
            if callable(exit_):
                exit_(None, None, None)
        handles.clear()


def iter_blocks(plan: List[Tuple[str, List[TensorSource]]]) -> Iterator[Tuple[str, Iterator[Tuple[str, torch.Tensor]]]]:
    """The plan as ``write_model``'s streaming form: (block name, tensors read when the writer reaches them)."""
    for name, sources in plan:
        yield name, _block_tensors(sources)
