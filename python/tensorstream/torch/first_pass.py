"""The first passes of a model whose store is not written yet, served straight from its checkpoint.

``from_pretrained`` of a checkpoint the store does not hold used to write the whole store (read the checkpoint,
checksum, write, fsync: 4-8 s for 3.2 GB on the 2-core VM) before the first token. Now it returns at once, and each
streamed block's forward loads the block's tensors from the checkpoint (``safetensors`` maps) and drops them after
the block ran: one block in memory at a time, as when streaming. The store is written on a thread that starts when
the first forward pass ends (so the first token shares neither the disk nor the cores with it; measured on the
3.2 GB Llama: first forward 1.9 s alone, 3.8-5 s beside the writer) or when something needs the store, at the
lowest CPU priority. At the first forward after the write has
finished (and with no block in use), the model is bound to the store exactly as ``offload`` would have bound it, and
streams from then on. Outputs are the same bit for bit: both paths take the same checkpoint values through the same
cast.

Anything that needs the offloaded state (``get_model_statistics``, ``cleanup_tensorstream()``, ``model.to``) waits
for the write and binds first. A write that fails is raised there, or by the next forward, as the error the write
raised; the store is left as it was (the writer publishes atomically or not at all).

CPU only: on a device, ``from_pretrained`` writes first and binds after (``offload``'s path).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError
from .checkpoint import TensorSource, _block_tensors
from .hooks import nesting_hooks, placeholder
from .meta import Materialization
from .offload import CLEANUP_ATTR, STATE_ATTR, OffloadPlan, OffloadState, StoredModel, _Cleanup, bind_model, store_model
from .partition import RESIDENT_BLOCK, Block

logger = logging.getLogger("tensorstream")

__all__ = ["CheckpointPass"]


class _Depth(threading.local):
    def __init__(self) -> None:
        self.held: Dict[int, int] = {}  # block position -> nesting depth in this thread
        self.frames: List[Tuple[int, Optional[int]]] = []  # (id(module), block position or None): nesting_hooks


class CheckpointPass:
    """Stands in for the OffloadState (as ``model._tensorstream_state``) until the store is written and bound."""

    def __init__(self, model: nn.Module, plan: OffloadPlan, checkpoint_plan: List[Tuple[str, List[TensorSource]]]):
        self._model = weakref.ref(model)
        self._plan = plan
        self._checkpoint_plan = checkpoint_plan
        streamed = plan.partition.streamed
        plans = dict(checkpoint_plan)
        self._blocks: List[Tuple[Block, List[TensorSource]]] = [(b, plans[b.name]) for b in streamed]
        # Entries by tensor name, per block: an entry's param changes at materialisation, the entry does not.
        self._entries = [{entry.name: entry for entry in b.params} for b in streamed]
        self._resident_sources: List[TensorSource] = plans.get(RESIDENT_BLOCK, [])
        self._pins = [0] * len(self._blocks)
        self._lock = threading.Lock()
        self._depth = _Depth()
        self._handles: List[Any] = []
        self._done = threading.Event()
        self._stored: Optional[StoredModel] = None
        self._error: Optional[BaseException] = None
        self._state: Optional[OffloadState] = None
        # Not a daemon: a process that ends while the store is written waits for the write to finish (it is
        # published whole or not at all either way, but a writer torn down mid-call aborts the process).
        self._writer = threading.Thread(target=self._write, name="tensorstream-store-writer", daemon=False)

    # -- start ---------------------------------------------------------------------------------------------------

    def start(self, model: nn.Module) -> nn.Module:
        """Starts the store write and makes the model runnable from the checkpoint; returns it."""
        with torch.inference_mode(False):
            values = dict(_block_tensors(self._resident_sources)) if self._resident_sources else {}
        materialization = Materialization(self._plan.partition, self._plan.resident, values)
        materialization.apply(model)  # streamed parameters hold placeholders; resident ones their values
        try:
            for position, (block, _sources) in enumerate(self._blocks):
                for module in block.modules:
                    pre, post = self._hooks(position)
                    self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
                    self._handles.append(module.register_forward_hook(post, always_call=True))
            self._handles.append(model.register_forward_pre_hook(self._root_pre_hook, prepend=True))
            self._handles.append(model.register_forward_hook(self._root_post_hook, always_call=True))
        except BaseException:
            self._remove_hooks()
            materialization.undo()
            raise
        object.__setattr__(model, STATE_ATTR, self)
        object.__setattr__(model, CLEANUP_ATTR, _Cleanup(model))
        logger.info("from_pretrained: model '%s' is not in %s yet: forward passes read the checkpoint until it is "
                    "written (from the end of the first pass, in the background)", self._plan.model_id,
                    self._plan.config.storage_path)
        return model

    def _start_writer(self) -> None:
        with self._lock:
            if not self._writer.is_alive() and not self._done.is_set() and self._writer.ident is None:
                self._writer.start()

    def _write(self) -> None:
        try:
            # The lowest CPU priority for this thread (and the threads it starts): forward passes, the first token
            # above all, come first; the write takes the time they leave. Linux nice values are per thread.
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except (OSError, AttributeError):
                pass
            model = self._model()
            if model is None:
                return
            # No progress bar from the background: it would draw over whatever the process prints meanwhile
            # (generated text); the write is logged when it starts and when the store is bound.
            quiet = dataclasses.replace(self._plan, config=dataclasses.replace(self._plan.config, progress=False))
            self._stored = store_model(model, quiet, self._checkpoint_plan)
        except BaseException as error:  # noqa: BLE001 - handed to the caller thread by complete_offload
            self._error = error
        finally:
            self._done.set()

    # -- serving from the checkpoint -------------------------------------------------------------------------------

    def _hooks(self, position: int):
        def enter() -> bool:
            self._load(position)
            return True

        return nesting_hooks(position, self._depth, enter, lambda: self._unload(position))

    def _load(self, position: int) -> None:
        _block, sources = self._blocks[position]
        with self._lock:
            if self._pins[position] == 0:
                entries = self._entries[position]
                with torch.inference_mode(False):
                    for name, tensor in _block_tensors(sources):
                        entries[name].param.data = tensor
            self._pins[position] += 1

    def _unload(self, position: int) -> None:
        block, _sources = self._blocks[position]
        with self._lock:
            self._pins[position] -= 1
            if self._pins[position] == 0:
                with torch.inference_mode(False):
                    for entry in block.params:
                        entry.param.data = placeholder(entry.param.dtype, tuple(entry.param.shape))

    def _root_post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._start_writer()
        return None

    def _root_pre_hook(self, module: nn.Module, args: Any) -> None:
        if self._done.is_set() and not self._depth.held:
            with self._lock:
                idle = not any(self._pins)
            if idle:
                self.complete_offload()
        return None

    # -- the switch to the store -------------------------------------------------------------------------------------

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def complete_offload(self) -> OffloadState:
        """Waits for the store write, then binds the model to the store (once); returns its OffloadState. Raises
        what the write raised."""
        if self._state is not None:
            return self._state
        self._start_writer()
        self._done.wait()
        if self._error is not None:
            raise self._error
        model = self._model()
        if model is None:
            raise ConfigError("the model went away before its store was bound", field="model")
        deadline = time.monotonic() + 60
        while True:  # a forward running from the checkpoint (another thread) finishes its block first
            with self._lock:
                if not any(self._pins):
                    self._remove_hooks()
                    break
            if self._depth.held:
                raise ConfigError("the store cannot be bound from inside a forward pass that reads the checkpoint",
                                  field="model")
            if time.monotonic() > deadline:
                raise ConfigError("a forward pass kept reading the checkpoint for 60 s: the store was not bound",
                                  field="model")
            time.sleep(0.01)
        bind_model(model, self._plan, self._stored)  # attaches the real state (replacing this one)
        self._state = getattr(model, STATE_ATTR)
        logger.info("from_pretrained: model '%s' written (%s); streaming from the store now", self._plan.model_id,
                    self._stored.outcome)
        return self._state

    def __getattr__(self, name: str) -> Any:
        # Code that reads the offloaded state (model._tensorstream_state.model_id, ...) gets the real one.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.complete_offload(), name)
