"""Embeddings read by rows: an ``nn.Embedding`` block is never streamed whole; each forward reads only the rows of
its input ids from the store.

A forward of an embedding needs ``len(unique(ids))`` rows, not the table: one decoded token of a Llama is one 8-16
KB row of a 300+ MB table. Streaming the table as a block either spends that much of the budget to keep it or reads
it whole on every token. Such a block instead stays out of the engine (it takes no budget and no arena), its weight
keeps the memory-less placeholder, and its module's forward becomes::

    ids -> unique sorted rows (+ inverse) -> StoreReader.read_rows into a (rows, dim) tensor
        -> torch.nn.functional.embedding(inverse, rows)

which gathers exactly the values the plain module gathers (bit-identical). ``StoreReader.read_rows`` reads each
stored chunk that covers a requested row once, checks its checksum (``Config.verify_checksums``), decodes it when
compressed, and releases the GIL: forwards from many threads read concurrently.

Which blocks qualify (:func:`row_read_blocks`): a streamed block of exactly one parameter, owned by exactly one
module, which is an ``nn.Embedding`` whose forward is ``nn.Embedding.forward`` (no subclass override, no instance
``forward`` set by another library) with ``max_norm=None`` (max_norm renormalises the weight in place), and the
parameter is registered in no other module (a tied embedding, GPT-2's ``wte`` shared with ``lm_head``, keeps the
streamed path: the other module needs the whole table).

Such a table is written with chunks of about 64 KiB (:func:`row_chunk_size`), not the model's 4 MiB: a forward reads
and verifies the chunks that hold its rows, so a decoded token reads 64 KiB of a Llama's table instead of 4 MiB, and a
two-sentence MiniLM forward about 1 MB of its 47 MB table instead of 29 MB. When the row size allows, a chunk holds
whole rows (its size is a multiple of both the row and 4 KiB), so no row needs two chunks.

The replacement forward is an instance attribute (``module.forward``), so forward hooks still run around it; it is
removed again by :meth:`RowEmbedding.remove` (``cleanup_tensorstream()``), which leaves the class's forward.
The replacement does not pass ``padding_idx`` to ``F.embedding``: it only changes gradients (the rows tensor has
none), and it indexes the full table, not the gathered rows.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError, CorruptionError
from .hooks import placeholder
from .partition import Block, Partition

logger = logging.getLogger("tensorstream")

__all__ = ["qualifies_for_rows", "row_read_blocks", "row_chunk_size", "row_chunk_sizes", "RowEmbedding"]

# Bytes per chunk of a table read by rows. Smaller chunks read fewer bytes per row but cost a manifest record (about
# 110 bytes of JSON) and a read each: 64 KiB keeps a 1 GB table's records under 2 MB and one read about as cheap as
# a 4 KiB one on an SSD.
ROW_CHUNK_TARGET = 64 * 1024
_CHUNK_ALIGNMENT = 4096  # docs/format.md: chunk sizes are multiples of 4096


def _owners(model: nn.Module, param: nn.Parameter) -> List[nn.Module]:
    """Every module (each object once) that registers ``param`` directly."""
    return [m for m in model.modules() if any(p is param for p in m._parameters.values())]


def qualifies_for_rows(model: nn.Module, block: Block) -> bool:
    """Whether ``block`` is read by rows (the rules of this module's docstring)."""
    if not block.streamed or len(block.params) != 1 or len(block.modules) != 1:
        return False
    module = block.modules[0]
    param = block.params[0].param
    if not isinstance(module, nn.Embedding) or type(module).forward is not nn.Embedding.forward:
        return False
    if "forward" in module.__dict__ or module.max_norm is not None:
        return False
    if module._parameters.get("weight") is not param or param.dim() != 2 or param.shape[0] == 0:
        return False
    return len(_owners(model, param)) == 1


def row_read_blocks(model: nn.Module, partition: Partition) -> List[Block]:
    """The streamed blocks of ``partition`` that are read by rows, in partition order."""
    return [b for b in partition.streamed if qualifies_for_rows(model, b)]


def row_chunk_size(row_bytes: int, model_chunk_size: int) -> Optional[int]:
    """The chunk size for a table of ``row_bytes`` rows read by rows: about :data:`ROW_CHUNK_TARGET` (at least one
    row), a multiple of the row size when a multiple of both the row and 4096 fits, else whole 4 KiB pages (a row may
    then span two chunks). None when that is not below ``model_chunk_size`` (the model's chunks are small enough)."""
    if row_bytes <= 0:
        return None
    target = max(ROW_CHUNK_TARGET, -(-row_bytes // _CHUNK_ALIGNMENT) * _CHUNK_ALIGNMENT)
    unit = math.lcm(row_bytes, _CHUNK_ALIGNMENT)
    size = unit * (target // unit) if unit <= target else target
    return size if size < model_chunk_size else None


def row_chunk_sizes(blocks: List[Block], model_chunk_size: int) -> Dict[str, int]:
    """Tensor name -> chunk size for the tables of ``blocks`` (blocks that :func:`row_read_blocks` selected), for
    ``write_model(tensor_chunk_sizes=...)``."""
    out: Dict[str, int] = {}
    for block in blocks:
        entry = block.params[0]  # a 2-D table with rows (qualifies_for_rows)
        size = row_chunk_size(entry.nbytes // entry.param.shape[0], model_chunk_size)
        if size is not None:
            out[entry.name] = size
    return out


class RowEmbedding:
    """One embedding read by rows: its reader, its counters, and the forward installed on its module."""

    def __init__(self, block: Block, index: int, reader: Any, tensor_index: int, verify: bool,
                 device: Optional[torch.device] = None) -> None:
        self.block = block
        self.index = index                  # block index in the store
        self.name = block.name
        self.module: nn.Embedding = block.modules[0]  # type: ignore[assignment]
        self.module_name = block.module_names[0]
        entry = block.params[0]
        self.param_name = entry.name
        self.shape = tuple(entry.param.shape)
        self.dtype = entry.param.dtype
        self.row_bytes = entry.nbytes // self.shape[0]
        self.tensor_index = tensor_index
        self.verify = verify
        self.placeholder = placeholder(self.dtype, self.shape, device)
        self.tracer: Optional[Any] = None   # a trace.TraceCollector: each read becomes a "read" event
        self._reader = reader
        self._lock = threading.Lock()
        self._installed = False
        self.reset()

    @property
    def param(self) -> nn.Parameter:
        return self.block.params[0].param

    # -- counters ----------------------------------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self.reads = 0
            self.rows = 0
            self.bytes_read = 0
            self.read_ns = 0
            self.checksum_failures = 0

    def counters(self, reset: bool = False) -> Dict[str, int]:
        with self._lock:
            out = {"reads": self.reads, "rows": self.rows, "bytes_read": self.bytes_read, "read_ns": self.read_ns,
                   "checksum_failures": self.checksum_failures}
            if reset:
                self.reads = self.rows = self.bytes_read = self.read_ns = self.checksum_failures = 0
        return out

    # -- reading -----------------------------------------------------------------------------------------------

    def read_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (sorted, unique int64) of the table as a new ``(len(rows), dim)`` tensor."""
        reader = self._reader
        if reader is None:
            raise ConfigError(f"module '{self.module_name}' runs after its TensorStream engine was closed",
                              field="engine")
        rows = rows.to("cpu", torch.int64).contiguous()  # the reader fills host memory; the caller moves the result
        out = torch.empty((rows.numel(),) + self.shape[1:], dtype=self.dtype)
        started = time.monotonic_ns()
        try:
            nbytes = reader.read_rows(self.tensor_index, self.row_bytes, rows.data_ptr(), rows.numel(),
                                      out.data_ptr(), out.numel() * out.element_size(), verify_checksums=self.verify)
        except BaseException as error:
            if isinstance(error, CorruptionError):
                with self._lock:
                    self.checksum_failures += 1
            if hasattr(error, "add_note"):
                error.add_note(f"(TensorStream: reading rows of '{self.param_name}' for module '{self.module_name}')")
            raise
        ended = time.monotonic_ns()
        with self._lock:
            self.reads += 1
            self.rows += rows.numel()
            self.bytes_read += nbytes
            self.read_ns += ended - started
        tracer = self.tracer
        if tracer is not None:
            tracer.row_read(self.index, self.tensor_index, nbytes, started, ended)
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``nn.Embedding.forward`` on the rows of ``ids`` only."""
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            return F.embedding(ids, self.param)  # the error the plain module raises (the placeholder is never read)
        rows, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        count = self.shape[0]
        if rows.numel() and (int(rows[0]) < 0 or int(rows[-1]) >= count):
            raise IndexError(f"index out of range in self (embedding '{self.module_name}' has {count} rows)")
        return F.embedding(inverse.view_as(ids), self.read_rows(rows).to(ids.device))

    # -- installation ------------------------------------------------------------------------------------------

    def install(self) -> None:
        """Replaces the module's forward and its weight's data by the placeholder."""
        self.module.forward = self.forward  # an instance attribute: nn.Module.__call__ runs it, hooks included
        self._installed = True
        with torch.inference_mode(False):
            self.param.data = self.placeholder

    def remove(self, weight: Optional[torch.Tensor] = None) -> None:
        """Restores the class's forward (and the weight's data, when given)."""
        if self._installed:
            self.module.__dict__.pop("forward", None)
            self._installed = False
        if weight is not None:
            with torch.inference_mode(False):
                self.param.data = weight

    def close(self) -> None:
        self._reader = None
