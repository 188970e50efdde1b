"""``offload``: stream a model's weights from a TensorStream store; statistics, budget tuning and cleanup.

``offload(model, config)`` is three stages, each a function with its inputs and outputs explicit: ``plan_offload``
(-> OffloadPlan), ``store_model`` (-> StoredModel), ``bind_model``. Nothing about the model changes until the last
step of the last stage, so a failure anywhere leaves it exactly as it was:

1. plan: validates the config once (ConfigError naming the field; CUDA / GPUDIRECT are refused until the GPU
   transfer is wired to PyTorch) and partitions the model (partition.py): which blocks stream through the engine,
   which embeddings are read by rows, what stays resident, and on which device;
2. store: writes the streamed blocks, plus the resident parameters and persistent buffers in the ``"(resident)"``
   block, to ``config.storage_path`` once (content-addressed: the same weights with the same block layout are never
   written twice), with ``config``'s compression. A model on the meta device (meta.py) instead finds its store (or
   has it written block by block from ``checkpoint=``, checkpoint.py), is checked against it, and reads its
   resident values from it;
3. bind: sizes the budget and allocates the arena (arena.py), opens the engine over the streamed blocks only, less
   the embeddings read by rows (rows.py: an untied ``nn.Embedding`` block is never streamed whole, each forward
   reads the rows of its ids from the store; those blocks take no budget); then, all or nothing, swaps in a meta
   model's real Parameters and buffers, installs the hooks (hooks.py) and the row-reading forwards, and replaces
   every streamed parameter's data by a memory-less placeholder, then returns free memory to the OS
   (``malloc_trim``): the process's RSS drops by about the streamed bytes.

The model object is returned (the same object) and gains ``model.cleanup_tensorstream()``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import logging
import os
import threading
import weakref
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .. import _core
from ..config import Config, device_backends
from ..errors import ConfigError, StoreNotFoundError
from ..store import fingerprint, open_model, write_model
from ..config import check_trace_path
from ..trace import start_trace
from .arena import ALIGNMENT, Arena, BudgetPlan, plan_budget, slot_bytes
from .hooks import StreamBlock, StreamingRuntime, placeholder
from .checkpoint import Checkpoint, iter_blocks, plan_blocks
from .device import Placement, resolve_placement
from .meta import Materialization, check_against_store, check_meta_model, params_on_meta
from .partition import (RESIDENT_BLOCK, Block, Partition, ResidentTensor, describe, partition_model,
                        resident_tensors)
from .rows import RowEmbedding, row_chunk_sizes, row_read_blocks

logger = logging.getLogger("tensorstream")
io_logger = logging.getLogger("tensorstream.io")

STATE_ATTR = "_tensorstream_state"
CLEANUP_ATTR = "cleanup_tensorstream"

__all__ = ["offload", "plan_offload", "store_model", "bind_model", "move_model", "OffloadPlan", "StoredModel",
           "get_model_statistics", "optimize_memory_usage", "cleanup", "OffloadState", "write_trace"]


# ---- state -------------------------------------------------------------------------------------------------------


def _shutdown(engine: Any, arena_holder: List[Any]) -> None:
    """Closes the engine (the GIL is released while its threads stop), then lets the arena go."""
    try:
        if engine is not None:
            engine.close()
    finally:
        arena_holder.clear()


class OffloadState:
    """Everything TensorStream attached to one offloaded model (``model._tensorstream_state``)."""

    def __init__(self, config: Config, partition: Partition, model_id: Optional[str], plan: Optional[BudgetPlan],
                 arena: Optional[Arena], engine: Any, runtime: Optional[StreamingRuntime],
                 block_slots: Dict[str, int], write_outcome: str,
                 row_embeddings: Optional[List[RowEmbedding]] = None) -> None:
        # Set by bind_model: what a later model.to(device) rebinds from (the store is not written again).
        self.offload_plan: Optional["OffloadPlan"] = None
        self.stored: Optional["StoredModel"] = None
        self.placement: Placement = Placement("cpu", torch.device("cpu"))
        self.config = config
        self.partition = partition
        self.model_id = model_id
        self.storage_path = config.storage_path
        self.plan = plan
        self.arena = arena
        self.engine = engine
        self.runtime = runtime
        self.block_slots = block_slots
        self.write_outcome = write_outcome
        self.row_embeddings: List[RowEmbedding] = list(row_embeddings or [])
        self.closed = False
        self.lock = threading.Lock()
        self.counts_before_reset: Dict[str, float] = {}  # see _keep_before_reset
        self._finalizer = weakref.finalize(self, _shutdown, engine, [arena])

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.runtime is not None:
            self.runtime.closed = True
        for row_embedding in self.row_embeddings:
            row_embedding.close()
        tracer = self.runtime.tracer if self.runtime is not None else None
        self._finalizer()  # engine.close(), then the arena may be freed
        self.placement.close()
        if tracer is not None:
            tracer.close()  # writes Config.trace_path; the closed engine kept its last trace events for this
        self.engine = None
        self.arena = None


def _state(model: Any) -> OffloadState:
    state = getattr(model, STATE_ATTR, None) if isinstance(model, nn.Module) else None
    complete = getattr(state, "complete_offload", None)
    if callable(complete):  # served from its checkpoint while its store is written (first_pass.py): finish that
        state = complete()
    if not isinstance(state, OffloadState) or state.closed:
        raise ConfigError("this model is not offloaded by TensorStream (call tensorstream.offload(model, config))",
                          field="model")
    return state


# ---- offload -----------------------------------------------------------------------------------------------------


def _check_config(config: Any) -> Config:
    if not isinstance(config, Config):
        raise ConfigError(f"config must be a tensorstream.Config, got {type(config).__name__}", field="config")
    config.validate()
    return config


def _engine_backend(config: Config, placement: Placement) -> str:
    """The engine backend for ``config.backend`` on ``placement`` (the names of the engine's backend table)."""
    device_kinds = device_backends()
    if not placement.device_slots:
        if config.backend in device_kinds:
            raise ConfigError(f"invalid backend: {config.backend.name} streams into GPU memory; pass device='cuda:0' "
                              "(or Config.device) to run on a GPU, or use BackendType.AUTO, PREAD, IO_URING or MMAP "
                              "on the CPU", field="backend")
        return config.backend.value
    if config.backend.value not in ("auto", "cuda", "gpudirect"):
        raise ConfigError(f"invalid backend: {config.backend.name} reads into host memory; on {placement.name} use "
                          "BackendType.CUDA, GPUDIRECT or AUTO", field="backend")
    if placement.double is not None:  # the double emulates cuFile (as compat mode: no GDS)
        return "gpudirect" if config.backend.value == "gpudirect" else "cuda"
    from ..cuda import cuda_available
    status = cuda_available()
    if config.backend.value == "gpudirect":
        if status.cufile:
            if not status.gds:
                logger.warning("offload: GPUDIRECT on %s runs in cuFile's compatibility mode (no nvidia-fs kernel "
                               "module): reads go through cuFile's bounce buffers", placement.describe())
            return "gpudirect"
        logger.warning("offload: GPUDIRECT needs cuFile (%s): %s reads through pinned staging (BackendType.CUDA)",
                       status.cufile_reason, placement.describe())
        return "cuda"
    if config.backend.value == "auto" and status.gds:
        return "gpudirect"  # real GDS: storage -> GPU by DMA for raw chunks
    return "cuda"


def _metadata(model: nn.Module, partition: Partition) -> Dict[str, str]:
    cls = type(model)
    out = {"tensorstream.model_class": f"{cls.__module__}.{cls.__qualname__}",
           "tensorstream.torch_version": str(torch.__version__)}
    hf_config = getattr(model, "config", None)
    to_json = getattr(hf_config, "to_json_string", None)
    if callable(to_json):
        try:
            out["tensorstream.hf_config"] = to_json()
        except Exception:  # noqa: BLE001 - metadata is informative only
            logger.debug("could not serialise the model's config", exc_info=True)
    out["tensorstream.partition"] = json.dumps(
        [{"name": b["name"], "kind": b["kind"], "modules": b["modules"]} for b in describe(partition) if b["streamed"]])
    return out


def _write_store(config: Config, blocks: Dict[str, Dict[str, torch.Tensor]], model_id: Optional[str],
                 metadata: Dict[str, str], rewrite: bool = False,
                 tensor_chunk_sizes: Optional[Dict[str, int]] = None) -> "tuple[str, str]":
    """Writes (or finds) the model in the store; returns (model id, outcome).

    The fingerprint (docs/format.md §6) covers block names, which tensors each block holds, their names, dtypes,
    shapes and bytes: with ``model_id=None`` an existing model of that id is exactly these blocks. A *named* model
    that already exists must have the same fingerprint, or it would stream other weights (ConfigError).
    """
    result = write_model(config.storage_path, blocks, model_id=model_id,
                         compression_level=config.store_compression_level, metadata=metadata,
                         progress=config.progress, replace=rewrite, tensor_chunk_sizes=tensor_chunk_sizes)
    if result.outcome == "already_existed" and model_id is not None and result.fingerprint != fingerprint(blocks):
        raise ConfigError(f"model id '{model_id}' already holds other weights (or the same weights in other blocks) "
                          f"in {config.storage_path}; pass another model_id, or model_id=None for a content-addressed "
                          "id", field="model_id")
    return result.model_id, result.outcome


def store_holds(storage_path: Any, model_id: str) -> bool:
    """Whether the store at ``storage_path`` (which may not exist yet) holds model ``model_id``."""
    root = os.fspath(storage_path)
    return (os.path.isdir(root) and os.path.exists(os.path.join(root, "STORE"))
            and _core.StorageDirectory.open_existing(root).has_model(model_id))


def _store_for_meta_model(model: nn.Module, config: Config, model_id: str, checkpoint: Any, partition: Partition,
                           resident: List[ResidentTensor], rewrite: bool = False,
                           checkpoint_plan: Optional[list] = None,
                           tensor_chunk_sizes: Optional[Dict[str, int]] = None) -> "Tuple[str, str]":
    """Finds model ``model_id`` of a meta model in the store, or writes it from ``checkpoint`` block by block when
    it is not there or ``rewrite`` (StoreNotFoundError when it is not there and there is no checkpoint)."""
    root = config.storage_path
    if store_holds(root, model_id) and not (rewrite and checkpoint is not None):
        return model_id, "already_existed"  # the checkpoint is not even opened
    if checkpoint is None:
        raise StoreNotFoundError(
            errno.ENOENT, f"the store {root} holds no model '{model_id}': a model on the meta device gets its weights "
            f"from the store. Offload the real model once with model_id='{model_id}' (or pass the fp-... id an "
            "earlier offload reported), or pass checkpoint='path/to/checkpoint' to write the store from a Hugging "
            "Face safetensors checkpoint", root)
    source = Checkpoint(checkpoint)
    # Every tensor found and its shape checked first (or already, by the caller: first_pass.py plans before it
    # changes the model and writes from another thread).
    plan = checkpoint_plan if checkpoint_plan is not None else plan_blocks(source, model, partition, resident)
    metadata = _metadata(model, partition)
    metadata["tensorstream.checkpoint"] = source.path
    metadata[LEVEL_KEY] = str(config.store_compression_level)
    metadata[MIN_LAYER_KEY] = str(config.min_layer_size)
    result = write_model(root, iter_blocks(plan), model_id=model_id, compression_level=config.store_compression_level,
                         metadata=metadata, progress=config.progress, replace=rewrite,
                         tensor_chunk_sizes=tensor_chunk_sizes, total_bytes=partition.streamed_bytes + sum(r.tensor.numel() * r.tensor.element_size()
                                                                   for r in resident))
    logger.info("offload: wrote model '%s' to %s from checkpoint %s (%d bytes)", model_id, root, source.path,
                result.raw_bytes)
    return result.model_id, result.outcome


# Store metadata: the compression level a model was written with (absent in stores written before it was kept).
LEVEL_KEY = "tensorstream.compression_level"
# ... and the min_layer_size that partitioned it: a model rebuilt from the store (tensorstream serve MODEL_ID) must
# partition the same way to bind to it.
MIN_LAYER_KEY = "tensorstream.min_layer_size"


def stored_compression_level(store: Any) -> Optional[int]:
    """The level ``store`` (an open ModelStore) was written with: from its metadata, else 0 when every chunk is raw,
    else None (compressed at an unknown level)."""
    text = store.metadata.get(LEVEL_KEY)
    if text is not None and text.isdigit():
        return int(text)
    compressed = any(store.info(name)["compressed"] for name in store.tensor_names())
    return None if compressed else 0


def _warn_on_other_encoding(store: Any, config: Config) -> None:
    """A reused model whose encoding is not the one the config asks for: say so, and how to rewrite it. The weights
    are the same (the fingerprint or the named id says so); only their encoding on disk differs."""
    stored = stored_compression_level(store)
    wanted = config.store_compression_level
    if stored == wanted:
        return

    def describe(level: Optional[int]) -> str:
        if level is None:
            return "compressed (level unknown)"
        return "raw (compression off)" if level == 0 else f"compression level {level}"

    logger.warning("offload: model '%s' in %s is stored %s, but the config asks for %s; it is reused as stored. To "
                   "rewrite it with the config's encoding, pass offload(..., rewrite=True) or run `tensorstream "
                   "convert CHECKPOINT --storage-path %s --model-id %s --compression-level %d --replace`",
                   store.model_id, config.storage_path, describe(stored), describe(wanted), config.storage_path,
                   store.model_id, wanted)


def _note_whole_chunk_tables(store: Any, chunk_sizes: Dict[str, int], config: Config) -> None:
    """A reused model whose tables read by rows have the model's large chunks (stores written before tables got
    their own): it works, but each row read verifies a whole chunk. Say how to rewrite it."""
    for name, size in chunk_sizes.items():
        stored = store.info(name)["chunk_size"] if name in store.tensor_names() else size
        if stored > size:
            logger.info("offload: model '%s' stores '%s', which is read by rows, in chunks of %d bytes: each row "
                        "read verifies a whole chunk. offload(..., rewrite=True) rewrites it with chunks of %d bytes",
                        store.model_id, name, stored, size)


def _tie_weights(model: nn.Module) -> None:
    """A Hugging Face model built under init_empty_weights() has its tied weights untied (accelerate re-creates
    every parameter it registers); ``tie_weights()`` ties them again, as from_pretrained does after loading."""
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        try:
            tie()
        except Exception:  # noqa: BLE001 - the store check below reports what differs
            logger.warning("offload: %s.tie_weights() failed on the meta model", type(model).__name__, exc_info=True)


def _malloc_trim() -> None:
    """Returns freed heap memory to the OS (glibc keeps freed chunks otherwise, and RSS would not drop)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


# ---- offload: plan -> store -> bind ------------------------------------------------------------------------------


@dataclasses.dataclass
class OffloadPlan:
    """Stage 1 (plan_offload): the config, read and checked once, and what becomes of each part of the model."""

    config: Config
    model_id: Optional[str]
    checkpoint: Optional[Union[str, "os.PathLike[str]"]]
    on_meta: bool                    # parameters on the meta device: the weights come from the store
    partition: Partition
    by_rows: List[Block]             # untied embeddings read by rows (rows.py), outside the engine and its budget
    engine_blocks: List[Block]       # the blocks the engine streams
    resident: List[ResidentTensor]   # parameters and persistent buffers that never stream
    placement: Placement             # where slots and resident tensors live, and how hooks wait (device.py)
    rewrite: bool = False            # write the model anew even when the store holds it (another encoding)


@dataclasses.dataclass
class StoredModel:
    """Stage 2 (store_model): the model in the store, and what binding needs of its manifest."""

    model_id: Optional[str]          # None: nothing to store (no parameter, no persistent buffer)
    outcome: str                     # "written", "already_existed", "nothing_to_stream"
    block_index: Dict[str, int] = dataclasses.field(default_factory=dict)
    block_infos: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    tensor_infos: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    resident_values: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # a meta model's


def offload(model: nn.Module, config: Config, *, model_id: Optional[str] = None,
            checkpoint: Optional[Union[str, "os.PathLike[str]"]] = None, device: Any = None,
            rewrite: bool = False) -> nn.Module:
    """See :func:`tensorstream.offload`. Three stages; only the last changes the model."""
    plan = plan_offload(model, config, model_id, checkpoint, device, rewrite)
    stored = store_model(model, plan)
    return bind_model(model, plan, stored)


def plan_offload(model: nn.Module, config: Any, model_id: Optional[str],
                 checkpoint: Optional[Union[str, "os.PathLike[str]"]], device: Any = None,
                 rewrite: bool = False) -> OffloadPlan:
    """Checks the model and the config (ConfigError naming the field), resolves the device (``device=``, else
    ``config.device``) and partitions the model (partition.py)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}", field="model")
    config = _check_config(config)
    placement = resolve_placement(device if device is not None else config.device)
    _engine_backend(config, placement)  # a host-only backend with a device is refused before anything is written
    existing = getattr(model, STATE_ATTR, None)
    if isinstance(existing, OffloadState) and not existing.closed:
        raise ConfigError("this model is already offloaded (call model.cleanup_tensorstream() before offloading it "
                          "again)", field="model")
    on_meta = params_on_meta(model)  # ConfigError when meta and real parameters are mixed
    for name, param in model.named_parameters():
        if param.device.type not in ("cpu", "meta"):
            raise ConfigError(f"parameter '{name}' is on {param.device}: offload() takes a model on the CPU (or the "
                              "meta device); pass device= (or Config.device) to run it on a GPU", field="model")
        if param.layout != torch.strided:
            raise ConfigError(f"parameter '{name}' has layout {param.layout}: only dense parameters can be streamed",
                              field="model")
    if checkpoint is not None and not on_meta:
        raise ConfigError("checkpoint= is for a model built without its weights (on the meta device, e.g. under "
                          "accelerate.init_empty_weights()); this model holds its weights, and offload() writes them "
                          "to the store itself", field="checkpoint")
    if on_meta:
        check_meta_model(model, model_id)  # model_id given, no non-persistent buffer on meta
        if not isinstance(model_id, str) or not _core.is_valid_model_id(model_id):
            raise ConfigError(f"{model_id!r} is not a valid model id (1-128 of [A-Za-z0-9._-], not starting with "
                              "'.' or '-')", field="model_id")
        _tie_weights(model)

    partition = partition_model(model, config.min_layer_size)
    streamed = partition.streamed
    # Untied embeddings are read by rows (rows.py), outside the engine; the engine keeps at least one block.
    by_rows = row_read_blocks(model, partition)
    if len(by_rows) == len(streamed):
        by_rows = []
    row_names = {b.name for b in by_rows}
    if config.debug_mode:
        for entry in describe(partition):
            logger.debug("block %s", json.dumps(entry))
    if not streamed:
        logger.warning("offload: no block of %s reaches min_layer_size=%d bytes; every parameter stays resident",
                       type(model).__name__, config.min_layer_size)
    return OffloadPlan(config=config, model_id=model_id, checkpoint=checkpoint, on_meta=on_meta, partition=partition,
                       by_rows=by_rows, engine_blocks=[b for b in streamed if b.name not in row_names],
                       resident=resident_tensors(model, partition), placement=placement, rewrite=bool(rewrite))


def store_model(model: nn.Module, plan: OffloadPlan, checkpoint_plan: Optional[list] = None) -> StoredModel:
    """Writes the model to the store, or finds it there (and checks a meta model against it); reads the manifest
    once for what binding needs. Nothing in the model changes: a failure here leaves it as it was.
    ``checkpoint_plan``: plan_blocks of the checkpoint, already made (a meta model only)."""
    config, partition, streamed = plan.config, plan.partition, plan.partition.streamed
    chunk_sizes = row_chunk_sizes(plan.by_rows, _core.DEFAULT_CHUNK_SIZE)  # tables read by rows: small chunks
    if plan.on_meta:
        stored_id, outcome = _store_for_meta_model(model, config, plan.model_id, plan.checkpoint, partition,
                                                   plan.resident, plan.rewrite, checkpoint_plan, chunk_sizes)
    elif streamed or plan.resident:
        blocks = {b.name: {e.name: e.param.detach() for e in b.params} for b in streamed}
        if plan.resident:
            blocks[RESIDENT_BLOCK] = {r.name: r.tensor.detach() for r in plan.resident}
        metadata = _metadata(model, partition)
        metadata[LEVEL_KEY] = str(config.store_compression_level)
        metadata[MIN_LAYER_KEY] = str(config.min_layer_size)
        stored_id, outcome = _write_store(config, blocks, plan.model_id, metadata, plan.rewrite, chunk_sizes)
        del blocks
    else:
        return StoredModel(None, "nothing_to_stream")  # no parameter, no persistent buffer
    stored = StoredModel(stored_id, outcome)
    with open_model(config.storage_path, stored_id) as store:
        if outcome == "already_existed":
            _warn_on_other_encoding(store, config)
            _note_whole_chunk_tables(store, chunk_sizes, config)
        if plan.on_meta:
            check_against_store(store, partition, plan.resident, config.storage_path)
            with torch.inference_mode(False):
                stored.resident_values = {r.name: store.read(r.name) for r in plan.resident}  # verified, kept
        stored.block_index = {name: i for i, name in enumerate(store.block_names())}
        stored.block_infos = {b.name: store.block_info(b.name) for b in streamed}
        stored.tensor_infos = {e.name: store.info(e.name) for b in streamed for e in b.params}
    return stored


def bind_model(model: nn.Module, plan: OffloadPlan, stored: StoredModel) -> nn.Module:
    """Sizes the budget, allocates the arena and opens the engine over the streamed blocks; then, all or nothing,
    swaps in a meta model's real tensors, installs the hooks and row readers and frees the streamed weights."""
    config, partition, placement = plan.config, plan.partition, plan.placement
    # A meta model's real tensors, swapped in at the commit; the partition now names the new Parameters.
    materialization = (Materialization(partition, plan.resident, stored.resident_values) if plan.on_meta else None)
    stored.resident_values = {}
    if not partition.streamed:
        if materialization is not None:
            materialization.apply(model)
        _move_resident(model, partition, placement.torch_device)
        state = OffloadState(config, partition, stored.model_id, None, None, None, None, {}, "nothing_to_stream")
        state.offload_plan, state.stored, state.placement = plan, stored, placement
        _attach(model, state)
        return model

    # Budget, arena, engine (the embeddings read by rows take no budget: the engine never holds them).
    slots = [stored.block_infos[b.name]["slot_size"] for b in plan.engine_blocks]
    position = {b.index: i for i, b in enumerate(plan.engine_blocks)}
    chains = [[position[i] for i in chain if i in position] for chain in partition.pinned_chains(model)]
    requested = config.budget_bytes
    if requested is not None and placement.device_slots:
        # On a device vram_budget_gb bounds what TensorStream holds there: the resident set and the slots.
        requested = max(requested - partition.resident_bytes, 0)
    budget = plan_budget(requested, slots, chains, placement_slack=not placement.device_slots)
    if placement.device_slots and config.budget_bytes is not None and budget.raised:
        need = budget.budget_bytes + partition.resident_bytes
        raise ConfigError(
            f"invalid vram_budget_gb: {config.vram_budget_gb} GB cannot hold what {placement.name} needs at once: "
            f"the resident set ({partition.resident_bytes} bytes) plus the largest set of blocks one forward pass "
            f"holds ({budget.budget_bytes} bytes) = {need} bytes. Raise vram_budget_gb to at least "
            f"{need / 1e9:.3f}, or raise min_layer_size so that fewer parameters stay resident", field="vram_budget_gb")
    if budget.raised:
        wanted = "the default" if budget.requested_bytes is None else f"vram_budget_gb={config.vram_budget_gb}"
        asked = budget.default_bytes if budget.requested_bytes is None else budget.requested_bytes
        logger.warning("TensorStream budget raised from %d bytes (%s) to %d bytes: the engine needs room for the "
                       "largest set of blocks one forward pass holds at once", asked, wanted, budget.budget_bytes)
    _check_device_memory(placement, budget.arena_bytes + partition.resident_bytes)
    placement.open()
    try:
        arena = placement.arena(budget.arena_bytes)
    except BaseException:
        placement.close()
        raise
    storage = _core.StorageDirectory.open_existing(config.storage_path)
    try:
        engine = _core.Engine(storage, stored.model_id, arena.address, arena.nbytes,
                              backend=_engine_backend(config, placement), **placement.engine_options(),
                              direct_io=config.direct_io, queue_depth=config.queue_depth,
                              num_io_threads=config.num_io_threads, budget_bytes=budget.budget_bytes,
                              prefetch_strategy=config.prefetch_strategy.value,
                              memory_pressure_mode=config.memory_pressure_mode,
                              verify_checksums=config.verify_checksums,
                              host_cache_bytes=config.host_cache_bytes if placement.device_slots else 0,
                              blocks=[stored.block_index[b.name] for b in plan.engine_blocks])  # never "(resident)"
    except BaseException:
        placement.close()
        raise
    try:
        state, runtime, row_embeddings = _runtime_state(plan, stored, budget, arena, storage, engine)
        state.offload_plan, state.stored, state.placement = plan, stored, placement
    except BaseException:
        engine.close()
        placement.close()
        raise
    # Commit: real tensors for a meta model, hooks, placeholders (the original tensors are freed here), then the
    # resident set to the placement's device.
    source_device = _resident_device(model, partition)
    try:
        if materialization is not None:
            materialization.apply(model)
        runtime.install()
        for row_embedding in row_embeddings:
            row_embedding.install()
        _move_resident(model, partition, placement.torch_device)
    except BaseException:
        for row_embedding in row_embeddings:
            row_embedding.remove()
        if source_device is not None:
            _move_resident(model, partition, source_device)
        if materialization is not None:
            materialization.undo()
        state.close()
        raise
    _attach(model, state)
    _malloc_trim()
    for row_embedding in row_embeddings:
        logger.info("offload: embedding '%s' (%s, %d bytes) is read by rows from the store, not streamed: it takes "
                    "no budget", row_embedding.module_name, row_embedding.param_name, row_embedding.block.nbytes)
    logger.info("offloaded %s as '%s' (%s) on %s: %d blocks stream (%d bytes), %d resident (%d bytes); budget %d "
                "bytes, backend %s", type(model).__name__, stored.model_id, stored.outcome, placement.describe(),
                len(partition.streamed), partition.streamed_bytes, len(partition.resident), partition.resident_bytes,
                budget.budget_bytes, engine.backend_name)
    return model


def _streamed_param_ids(partition: Partition) -> set:
    return {id(e.param) for b in partition.streamed for e in b.params}


def _resident_device(model: nn.Module, partition: Partition) -> Optional[torch.device]:
    """The device of the first resident parameter or buffer (None when there is none)."""
    streamed = _streamed_param_ids(partition)
    for module in model.modules():
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is not None and id(tensor) not in streamed and tensor.device.type != "meta":
                return tensor.device
    return None


def _move_resident(model: nn.Module, partition: Partition, device: torch.device) -> None:
    """Moves every parameter and buffer that does not stream to ``device``, in place (the Parameter objects stay, as
    with ``nn.Module.to``). Streamed parameters are left alone: they hold memory-less placeholders that a plain
    ``.to()`` would turn into full-size copies."""
    streamed = _streamed_param_ids(partition)
    with torch.no_grad(), torch.inference_mode(False):
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None and id(param) not in streamed and param.device != device:
                    param.data = param.data.to(device)
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device != device:
                    module._buffers[name] = buffer.to(device)


def _check_device_memory(placement: Placement, needed: int) -> None:
    """On a real GPU: the arena and the resident set must fit in free memory (the guide's "CUDA out of memory")."""
    if not placement.device_slots or placement.double is not None:
        return
    free, total = torch.cuda.mem_get_info(placement.torch_device)
    if needed > free:
        raise ConfigError(
            f"invalid vram_budget_gb: {placement.name} has {free} bytes free of {total}, and TensorStream needs "
            f"{needed} bytes (resident set + streaming slots). Lower vram_budget_gb (down to the minimum the warning "
            "names), free GPU memory, or raise min_layer_size so that fewer parameters stay resident",
            field="vram_budget_gb")


def _runtime_state(plan: OffloadPlan, stored: StoredModel, budget: BudgetPlan, arena: Arena, storage: Any,
                   engine: Any) -> "Tuple[OffloadState, StreamingRuntime, List[RowEmbedding]]":
    """The hooks' runtime, the row readers and the trace over an open engine (nothing installed yet)."""
    config = plan.config
    reason = engine.backend_fallback_reason
    if reason:
        level = logging.INFO if config.backend.value == "auto" else logging.WARNING
        io_logger.log(level, "I/O backend %s (asked for %s): %s", engine.backend_name, config.backend.value, reason)
    stream_blocks = []
    for b in plan.engine_blocks:
        tensors = []
        for e in b.params:
            info = stored.tensor_infos[e.name]
            tensors.append((e.param, info["slot_offset"], info["nbytes"], e.param.dtype, tuple(e.param.shape)))
        stream_blocks.append(StreamBlock(b, stored.block_index[b.name], stored.block_infos[b.name]["slot_size"],
                                         tensors, plan.placement.torch_device))
    runtime = StreamingRuntime(engine, arena, stream_blocks, debug=config.debug_mode, placement=plan.placement)
    row_embeddings = []
    if plan.by_rows:
        reader = _core.StoreReader.open(storage, stored.model_id)  # thread-safe (pread only); shared by all calls
        for b in plan.by_rows:
            row_embeddings.append(RowEmbedding(b, stored.block_index[b.name], reader,
                                               stored.tensor_infos[b.params[0].name]["index"],
                                               config.verify_checksums, plan.placement.torch_device))
    if config.trace_path is not None:  # a Chrome trace of this model (tensorstream/trace.py)
        runtime.tracer = start_trace(engine, config, stored.model_id, stream_blocks, owner=runtime)
        for row_embedding in row_embeddings:
            row_embedding.tracer = runtime.tracer
            runtime.tracer.block_names[row_embedding.index] = row_embedding.name
            runtime.tracer.block_bytes[row_embedding.index] = row_embedding.block.nbytes
    slots_by_name = {b.name: slot_bytes(stored.block_infos[b.name]["slot_size"]) for b in plan.engine_blocks}
    slots_by_name.update({b.name: 0 for b in plan.by_rows})
    state = OffloadState(config, plan.partition, stored.model_id, budget, arena, engine, runtime, slots_by_name,
                         stored.outcome, row_embeddings)
    return state, runtime, row_embeddings


class _Cleanup:
    """``model.cleanup_tensorstream()``: a callable that does not keep the model alive."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)

    def __call__(self) -> None:
        model = self._model()
        if model is not None:
            cleanup(model)

    def __repr__(self) -> str:
        return "<TensorStream cleanup: restore the weights into memory and close the engine>"


class _Move:
    """``model.to(...)``, ``model.cuda(...)`` and ``model.cpu()`` of an offloaded model: a device change rebinds it
    (move_model); anything else is the module's own method. Does not keep the model alive."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        self._model = weakref.ref(model)
        self._kind = kind

    def __call__(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = self._model()
        if model is None:  # pragma: no cover - the bound method outlived its model
            raise ConfigError("the model is gone", field="model")
        if self._kind == "cpu":
            return move_model(model, "cpu")
        if self._kind == "cuda":
            device = args[0] if args else kwargs.get("device")
            return move_model(model, torch.device("cuda", device) if isinstance(device, int) else (device or "cuda"))
        device, dtype, _non_blocking, _memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            raise ConfigError(f"model.to({dtype}) on an offloaded model: the store holds its weights in their "
                              "offloaded dtypes; call model.cleanup_tensorstream(), convert, then offload again",
                              field="dtype")
        return model if device is None else move_model(model, device)

    def __repr__(self) -> str:
        return f"<TensorStream {self._kind}(): moves an offloaded model by rebinding its engine>"


_MOVE_ATTRS = ("to", "cuda", "cpu")


# Every offloaded model's state in this process, for tensorstream.metrics (weak: a model that goes away leaves).
LIVE_STATES: "weakref.WeakSet[OffloadState]" = weakref.WeakSet()


def live_states() -> List[OffloadState]:
    """The states of the offloaded models alive in this process (closed ones left out), in no particular order."""
    return [state for state in list(LIVE_STATES) if not state.closed]


def _attach(model: nn.Module, state: OffloadState) -> None:
    LIVE_STATES.add(state)
    object.__setattr__(model, STATE_ATTR, state)
    object.__setattr__(model, CLEANUP_ATTR, _Cleanup(model))
    for kind in _MOVE_ATTRS:
        object.__setattr__(model, kind, _Move(model, kind))


def move_model(model: nn.Module, device: Any) -> nn.Module:
    """Moves an offloaded model to ``device`` ("cpu", "cuda:N"): the resident set moves, the engine is reopened with
    slots on the new device, the store is not written again. On failure the model stays where it was."""
    state = _state(model)
    target = resolve_placement(device)
    if target.name == state.placement.name:
        return model
    if state.offload_plan is None or state.stored is None:  # pragma: no cover - set by every bind
        raise ConfigError("this offloaded model cannot be moved (no binding plan)", field="model")
    runtime = state.runtime
    if runtime is not None and runtime.pinned_blocks():
        raise ConfigError("cannot move the model while a forward pass is running", field="model")
    old_plan = state.offload_plan
    new_plan = dataclasses.replace(old_plan, placement=target, on_meta=False)
    _engine_backend(new_plan.config, target)  # a host-only backend for a device is refused before anything changes
    _unbind(model, state, target.torch_device)
    try:
        bind_model(model, new_plan, state.stored)
    except BaseException:
        back = dataclasses.replace(old_plan, placement=resolve_placement(state.placement.name), on_meta=False)
        _unbind_placeholders(state, back.placement.torch_device)
        bind_model(model, back, state.stored)
        raise
    logger.info("moved %s from %s to %s", type(model).__name__, state.placement.describe(), target.describe())
    return model


def _unbind_placeholders(state: OffloadState, device: torch.device) -> None:
    """Gives every streamed parameter a placeholder on ``device`` (bind_model then installs its own)."""
    with torch.inference_mode(False):
        for b in state.partition.streamed:
            for e in b.params:
                e.param.data = placeholder(e.param.dtype, tuple(e.param.shape), device)


def _unbind(model: nn.Module, state: OffloadState, device: torch.device) -> None:
    """Takes the model off its engine without reading its weights back: hooks and row readers removed, streamed
    parameters on placeholders of ``device``, engine closed, TensorStream's attributes removed."""
    runtime = state.runtime
    if runtime is not None:
        runtime.remove_hooks()
        with runtime.lock:
            for sb in runtime.blocks:
                sb.bound_address = None
    for row_embedding in state.row_embeddings:
        row_embedding.remove()
    _unbind_placeholders(state, device)
    state.close()
    _detach(model)


def _detach(model: nn.Module) -> None:
    for attr in (STATE_ATTR, CLEANUP_ATTR) + _MOVE_ATTRS:
        if attr in model.__dict__:
            object.__delattr__(model, attr)


# ---- cleanup -----------------------------------------------------------------------------------------------------


def cleanup(model: nn.Module) -> None:
    """See ``model.cleanup_tensorstream()`` (documented in :func:`tensorstream.offload`)."""
    state = getattr(model, STATE_ATTR, None)
    complete = getattr(state, "complete_offload", None)
    if callable(complete):  # finish the store write and bind first: cleanup then reads the weights back from it
        state = complete()
    if not isinstance(state, OffloadState):
        return
    runtime = state.runtime
    if state.closed or runtime is None:
        state.close()
        _detach(model)
        return
    # Read every streamed weight back first: if that fails (a corrupt store), the model stays offloaded and usable.
    restored: Dict[int, torch.Tensor] = {}
    with open_model(state.storage_path, state.model_id) as store:
        entries = [e for sb in runtime.blocks for e in sb.block.params]
        entries += [e for row_embedding in state.row_embeddings for e in row_embedding.block.params]
        for e in entries:
            if id(e.param) not in restored:
                restored[id(e.param)] = store.read(e.name, verify_checksums=state.config.verify_checksums).to(
                    state.placement.torch_device)
    _record_order(state)
    runtime.remove_hooks()
    with runtime.lock:
        for sb in runtime.blocks:
            for e in sb.block.params:
                e.param.data = restored[id(e.param)]
            sb.bound_address = None
    for row_embedding in state.row_embeddings:
        row_embedding.remove(restored[id(row_embedding.param)])
    state.close()
    _detach(model)
    logger.info("cleanup: %s restored into memory (%d bytes); store '%s' kept in %s", type(model).__name__,
                state.partition.streamed_bytes, state.model_id, state.storage_path)


def _record_order(state: OffloadState) -> None:
    """Records the learned execution order as defragment_storage's hint (best effort)."""
    try:
        runtime = state.runtime
        names: List[str] = []
        seen = set()
        for index in state.engine.learned_order():
            sb = runtime.by_index.get(index)
            if sb is not None and sb.name not in seen:
                seen.add(sb.name)
                names.append(sb.name)
        if names:
            from ..maintenance import record_execution_order

            record_execution_order(state.storage_path, state.model_id, names)
    except Exception:  # noqa: BLE001 - a hint only
        logger.debug("could not record the execution order", exc_info=True)


# ---- statistics --------------------------------------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else 0.0


def get_model_statistics(model: nn.Module, reset: bool = False) -> Dict[str, Any]:
    """See :func:`tensorstream.get_model_statistics`."""
    return state_statistics(_state(model), reset)


_EMPTY_HISTOGRAM = {"bounds_s": [], "counts": [0], "count": 0, "sum_s": 0.0}


def state_statistics(state: OffloadState, reset: bool = False) -> Dict[str, Any]:
    """get_model_statistics of the model ``state`` belongs to."""
    partition = state.partition
    resident_weights = partition.resident_bytes
    out: Dict[str, Any] = {
        "model_id": state.model_id,
        "storage_path": state.storage_path,
        "device": state.placement.describe(),
        "backend": None,
        "page_cache": None,
        "slot_access": "host" if not state.placement.device_slots else None,
        "transfer": None,
        "streamed_blocks": len(partition.streamed),
        "resident_blocks": len(partition.resident),
        "streamed_bytes": partition.streamed_bytes,
        "resident_bytes": resident_weights,
        "budget_bytes": 0,
        "requested_budget_bytes": state.config.budget_bytes,
        "arena_bytes": 0,
    }
    engine = state.engine
    if engine is None:
        out.update(vram_usage_bytes=resident_weights, vram_utilization=0.0, cache_hit_rate=0.0, prefetch_ready_rate=0.0, io_throughput_mbps=0.0,
                   bytes_read=0, bytes_delivered=0, stall_time_s=0.0, prefetch_hit_rate=0.0, acquires=0, hits=0, reuses=0,
                   misses=0, prefetch_hits=0, prefetches_issued=0, evictions=0, checksum_failures=0, io_errors=0,
                   held_bytes=0, in_flight_bytes=0, streamed_resident_bytes=0, static_bytes=0, lookahead=0,
                   prefetch_off=False, prefetch_checks=0,
                   row_read_blocks=[], row_reads=0, rows_read=0, row_bytes_read=0, staging_bytes=0,
                   staging_peak_in_use_bytes=0, h2d_bytes=0, h2d_throughput_gbps=0.0, direct_bytes=0,
                   host_tier_hits=0, host_tier_bytes=0, host_tier_held_bytes=0, tiers={}, device_stall_time_s=0.0,
                   blocks={}, load_latency=dict(_EMPTY_HISTOGRAM), wait_latency=dict(_EMPTY_HISTOGRAM))
        return out
    s = engine.stats()
    if reset:
        engine.reset_stats()
    row_counters = [(r, r.counters(reset=reset)) for r in state.row_embeddings]
    row_bytes = sum(c["bytes_read"] for _r, c in row_counters)
    held = s["resident_bytes"] + s["in_flight_bytes"]
    budget = engine.budget_bytes
    per_block: Dict[str, Dict[str, Any]] = {}
    for sb in state.runtime.blocks:
        counters = dict(s["blocks"][sb.index])
        counters["bytes"] = sb.block.nbytes
        counters["slot_bytes"] = state.block_slots[sb.name]
        counters["wait_s"] = counters.pop("wait_ns") / 1e9
        counters["load_s"] = counters.pop("load_ns") / 1e9
        per_block[sb.name] = counters
    for row_embedding, c in row_counters:
        # One "load" per forward that read rows; nothing is ever held, hit, prefetched or evicted.
        per_block[row_embedding.name] = {
            "loads": c["reads"], "hits": 0, "reuses": 0, "prefetch_hits": 0, "evictions": 0, "bytes_read": c["bytes_read"],
            "bytes": row_embedding.block.nbytes, "slot_bytes": 0, "wait_s": 0.0, "load_s": c["read_ns"] / 1e9,
            "read_by_rows": True, "row_reads": c["reads"], "rows_read": c["rows"], "row_bytes_read": c["bytes_read"]}
    blocks = {b.name: per_block[b.name] for b in partition.streamed if b.name in per_block}  # partition order
    rows_delivered = sum(c["rows"] * r.row_bytes for r, c in row_counters)
    out.update(
        backend=engine.backend_name,
        page_cache=engine.page_cache_policy,
        slot_access=engine.slot_access,
        transfer=engine.transfer_name,
        staging_bytes=s["staging_bytes"],
        staging_peak_in_use_bytes=s["staging_peak_in_use_bytes"],
        h2d_bytes=s["h2d_bytes"],
        direct_bytes=s["direct_bytes"],
        host_tier_hits=s["host_tier_hits"],
        host_tier_bytes=s["host_tier_bytes"],
        host_tier_held_bytes=s["host_tier_held_bytes"],
        tiers={"vram": {"hits": s["hits"], "hit_rate": s["hit_rate"]},
               "host": {"hits": s["host_tier_hits"], "bytes": s["host_tier_bytes"],
                        "held_bytes": s["host_tier_held_bytes"], "evictions": s["host_tier_evictions"],
                        "hit_rate": _ratio(s["host_tier_hits"], s["misses"])},
               "storage": {"loads": s["misses"] - s["host_tier_hits"], "bytes": s["bytes_read"] + row_bytes}},
        h2d_throughput_gbps=s["h2d_bytes"] / s["h2d_busy_ns"] if s["h2d_busy_ns"] else 0.0,
        budget_bytes=budget,
        arena_bytes=state.arena.nbytes if state.arena is not None else 0,
        vram_usage_bytes=held + resident_weights,
        vram_utilization=_ratio(held, budget),
        # Uses served from memory with no storage read for them: blocks kept from an earlier use, and (device
        # slots) loads from the host tier. "Resident when asked", which a prefetch makes true while every block is
        # still read every pass, is prefetch_ready_rate.
        cache_hit_rate=min(1.0, _ratio(s["reuses"] + s["host_tier_hits"], s["acquires"])),
        prefetch_ready_rate=s["hit_rate"],
        io_throughput_mbps=s["io_throughput_bytes_per_s"] / 1e6,
        bytes_read=s["bytes_read"] + row_bytes,
        bytes_delivered=s["bytes_delivered"] + rows_delivered,
        stall_time_s=s["wait_ns"] / 1e9,
        device_stall_time_s=s["device_stall_ns"] / 1e9,
        prefetch_hit_rate=_ratio(s["prefetch_hits"], s["acquires"]),
        acquires=s["acquires"],
        hits=s["hits"],
        reuses=s["reuses"],
        misses=s["misses"],
        prefetch_hits=s["prefetch_hits"],
        prefetches_issued=s["prefetches_issued"],
        evictions=s["evictions"],
        checksum_failures=s["checksum_failures"] + sum(c["checksum_failures"] for _r, c in row_counters),
        io_errors=s["io_errors"],
        held_bytes=held,
        in_flight_bytes=s["in_flight_bytes"],
        streamed_resident_bytes=s["resident_bytes"],
        static_bytes=engine.static_bytes,
        lookahead=engine.lookahead,
        prefetch_off=engine.prefetch_off,
        prefetch_checks=engine.prefetch_checks,
        row_read_blocks=[r.name for r in state.row_embeddings],
        row_reads=sum(c["reads"] for _r, c in row_counters),
        rows_read=sum(c["rows"] for _r, c in row_counters),
        row_bytes_read=row_bytes,
        blocks=blocks,
        load_latency=s["load_latency"],
        wait_latency=s["wait_latency"],
    )
    if reset:
        _keep_before_reset(state, out)
    return out


def _keep_before_reset(state: OffloadState, stats: Dict[str, Any]) -> None:
    """Adds the counters a reset is about to zero to ``state.counts_before_reset``, so that tensorstream.metrics
    can keep its counters monotonic (metric = what was reset away + the engine's current count)."""
    kept = state.counts_before_reset
    for key, value in stats.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            kept[key] = kept.get(key, 0) + value
        elif isinstance(value, dict) and "counts" in value:  # a latency histogram
            for i, count in enumerate(value["counts"]):
                kept[f"{key}[{i}]"] = kept.get(f"{key}[{i}]", 0) + count
            kept[f"{key}.sum_s"] = kept.get(f"{key}.sum_s", 0.0) + value["sum_s"]


def write_trace(model: Any, path: Optional[str] = None) -> str:
    """See :func:`tensorstream.write_trace`: the Chrome trace of an offloaded model so far, to ``path`` (default:
    its ``Config.trace_path``); returns the path. Tracing continues; the file is rewritten whole each time.

    Raises ConfigError: field ``model`` for a model that is not offloaded, ``trace_path`` when the model was
    offloaded without tracing (set ``Config.trace_path`` or ``TENSORSTREAM_TRACE``), ``path`` for a path whose
    directory does not exist or is not writable.
    """
    state = getattr(model, "__dict__", {}).get(STATE_ATTR)
    if not isinstance(state, OffloadState) or state.closed:
        raise ConfigError("this model is not offloaded by TensorStream (a model's trace is written when it is cleaned "
                          "up; call write_trace before cleanup_tensorstream)", field="model")
    tracer = getattr(state.runtime, "tracer", None)
    if tracer is None:
        raise ConfigError("tracing is off for this model: offload it with Config(trace_path=...) or set "
                          "TENSORSTREAM_TRACE=/path/trace.json", field="trace_path")
    target = check_trace_path(path, "path") if path is not None else tracer.path
    return tracer.write(target)


# ---- budget ------------------------------------------------------------------------------------------------------


def optimize_memory_usage(model: nn.Module, target_utilization: float = 0.8) -> Dict[str, Any]:
    """See :func:`tensorstream.optimize_memory_usage`."""
    if isinstance(target_utilization, bool) or not isinstance(target_utilization, (int, float)) \
            or not 0.0 < float(target_utilization) <= 1.0:
        raise ConfigError(f"invalid target_utilization: {target_utilization!r} must be a number in (0, 1]",
                          field="target_utilization")
    state = _state(model)
    engine = state.engine
    if engine is None:
        return {"old_budget_bytes": 0, "new_budget_bytes": 0, "arena_bytes": 0, "minimum_budget_bytes": 0,
                "target_utilization": float(target_utilization), "evicted_blocks": 0, "held_bytes_before": 0,
                "held_bytes_after": 0, "clamped": False}
    with state.lock:
        arena_bytes = state.arena.nbytes - state.plan.slack_bytes  # the slack is for placement, not for the budget
        minimum = state.plan.minimum_bytes
        wanted = int(float(target_utilization) * arena_bytes) // ALIGNMENT * ALIGNMENT
        new_budget = min(max(wanted, minimum), arena_bytes)
        before = engine.stats()
        old_budget = engine.budget_bytes
        engine.set_budget(new_budget)
        after = engine.stats()
    result = {
        "old_budget_bytes": old_budget,
        "new_budget_bytes": engine.budget_bytes,
        "arena_bytes": arena_bytes,
        "minimum_budget_bytes": minimum,
        "target_utilization": float(target_utilization),
        "evicted_blocks": after["evictions"] - before["evictions"],
        "held_bytes_before": before["resident_bytes"] + before["in_flight_bytes"],
        "held_bytes_after": after["resident_bytes"] + after["in_flight_bytes"],
        "clamped": new_budget != wanted,
    }
    logger.info("optimize_memory_usage: budget %d -> %d bytes (arena %d), %d blocks evicted", old_budget,
                result["new_budget_bytes"], arena_bytes, result["evicted_blocks"])
    return result
