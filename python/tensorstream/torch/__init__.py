"""PyTorch integration: ``from_pretrained``, ``offload``, ``get_model_statistics``, ``optimize_memory_usage``.

``torch`` is imported when one of these functions is first called, so ``import tensorstream`` works without it.
Implementation: partition.py (model -> blocks), arena.py (memory and budget), hooks.py (acquire / bind / release /
evict), offload.py (the steps below, statistics, budget tuning, cleanup), pretrained.py (a Hugging Face checkpoint
folder to an offloaded model), first_pass.py (serving from the checkpoint while its store is written).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Union

if TYPE_CHECKING:  # pragma: no cover
    import os

    from torch import nn

    from ..config import Config

__all__ = ["from_pretrained", "offload", "get_model_statistics", "optimize_memory_usage", "write_trace"]


def from_pretrained(path: Union[str, "os.PathLike[str]"], config: Optional["Config"] = None, *,
                    torch_dtype: Any = None, model_class: Any = None, model_id: Optional[str] = None,
                    device: Any = None, rewrite: bool = False, **hf_kwargs: Any) -> "nn.Module":
    """A Hugging Face model streamed from the store, in one call: the offloaded model, in eval mode, ready for
    ``generate()``. Outputs are bit-identical to ``transformers``' ``from_pretrained`` of the same checkpoint.

    ``path``: a checkpoint folder (``config.json`` with ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``), or a hub id already in the local Hugging Face cache (nothing is downloaded).
    ``config``: a :class:`tensorstream.Config` (default ``Config()``; without a ``storage_path`` from it or
    TENSORSTREAM_STORAGE_PATH, the store is ``~/.cache/tensorstream/store``). ``torch_dtype``: the dtype to compute
    and store in (weights are cast while the store is written; default: the checkpoint config's dtype, else
    float32). ``model_class``: the transformers class to build (default: the config's ``architectures[0]``, else
    ``AutoModel``). ``model_id``: the store id (default: derived from the checkpoint, dtype, class and compression
    level, so a second call writes nothing). ``device``, ``rewrite``: as for :func:`offload`. Other keyword
    arguments go to ``AutoConfig.from_pretrained`` (e.g. ``trust_remote_code``, ``revision``). The command line
    ``tensorstream convert CHECKPOINT`` writes the same store model without running it.

    The model is built without weights and the store is written straight from the checkpoint when it does not hold
    the id yet: memory stays about one block above the budget, never the whole model. On the CPU that write runs on
    a thread and the call returns at once: until it is done, each block's forward reads its tensors from the
    checkpoint and drops them after use, and the first forward after the write binds the model to the store
    (``first_pass.py``; the same outputs either way). ``get_model_statistics``, ``cleanup_tensorstream()`` and
    ``model.to`` wait for the write; a write that fails raises there or at the next forward. A checkpoint that does not match its config (a missing tensor, another shape), a missing shard or a
    truncated file is a ConfigError naming the file and the tensor, raised before the store is touched or, at the
    latest, before the new model is published: no partial store is left.
    """
    from .pretrained import from_pretrained as _from_pretrained

    return _from_pretrained(path, config, torch_dtype=torch_dtype, model_class=model_class, model_id=model_id,
                            device=device, rewrite=rewrite, **hf_kwargs)


def offload(model: "nn.Module", config: "Config", *, model_id: Optional[str] = None,
            checkpoint: Optional[Union[str, "os.PathLike[str]"]] = None, device: Any = None,
            rewrite: bool = False) -> "nn.Module":
    """Streams ``model``'s weights from ``config.storage_path`` from now on; returns the same model object.

    ``model`` either holds its weights (on the CPU; they are written to the store, then freed) or is built without
    them, every parameter on the meta device (see *Without the model in RAM* below).

    Steps (nothing about the model changes until the last one, so if any step fails, the error propagates and the
    model is left exactly as it was, still usable):

    1. **Partition** into blocks: every child of an outermost ``nn.ModuleList`` / ``nn.Sequential`` with parameters
       (the transformer layers), and the other parameter-holding modules, on their own or grouped until they reach
       ``config.min_layer_size`` bytes. Modules that share a parameter (tied embeddings and ``lm_head``) share a
       block. Blocks below ``min_layer_size`` stay *resident* (never streamed); ``min_layer_size=0`` streams every
       module with parameters. Buffers always stay resident.
    2. **Store** the streamed blocks once in ``config.storage_path``, and with them, in one extra block named
       ``"(resident)"`` that is never streamed, the resident parameters and the persistent buffers (what a model
       built on the meta device needs back). ``model_id=None``: the id is ``fp-`` + a content fingerprint, so
       offloading the same weights again writes nothing; ``model_id="name"``: stored under that name (a name that
       already holds other weights is a ConfigError). Compressed when ``config.compression_enabled``. Store files
       are a cache: they are kept after ``cleanup_tensorstream()``; ``cleanup_orphaned_files`` and
       ``Storage(path).remove(model_id)`` remove them.
    3. **Budget**: ``config.vram_budget_gb``, else a quarter of the streamed bytes; raised (with a WARNING on the
       ``tensorstream`` logger) to what the engine needs: the largest block, or the largest set of blocks one
       forward pass pins at once; lowered to the streamed blocks' total when it asks for more (nothing more could
       be used). The arena (host memory, allocated lazily) holds that budget; ``get_model_statistics`` reports it.
    4. **Hooks** pin a block while its modules run and bind its parameters to zero-copy views of the block's slot.
       Between uses, streamed parameters hold memory-less placeholders of the right dtype and shape (NaN-filled), so
       ``model.parameters()``, ``.dtype``, shapes, ``state_dict()`` keys and ``model.to("cpu")`` keep working; the
       streamed bytes are released (RSS drops by about that much). The *values* of streamed parameters outside a
       forward are placeholders (or views of a slot that may be reused): to save or inspect the weights, read them
       from the store (``tensorstream.open_model``) or call ``cleanup_tensorstream()`` first.

    Outputs are bit-identical to the plain model's. Forward calls from several threads at once are safe. Errors:
    ConfigError (naming the field) for bad settings, and for ``BackendType.CUDA`` / ``GPUDIRECT`` (the GPU transfer
    stage is not in this build: CPU execution only for now); IoError when the store cannot be written; a forward whose
    block fails to load raises CorruptionError / IoError naming the tensor and cause (never wrong output).

    **Devices.** ``device`` (or ``Config.device``): "cpu" (default) or "cuda" / "cuda:N". On a GPU the streamed
    blocks get slots in an arena allocated through torch on that device, the resident set moves there, and
    ``vram_budget_gb`` bounds both (a budget that cannot hold the resident set plus one pass's largest set of blocks
    is a ConfigError naming the minimum). Weights arrive through pinned staging buffers and asynchronous copies on a
    copy stream; the current stream waits for each block's ready event, and each release records a fence that the
    next copy into that slot waits for, so nothing blocks the host in the steady state. ``model.to("cuda:0")``,
    ``model.cuda()`` and ``model.cpu()`` after ``offload`` move an offloaded model the same way (the store is not
    written again). Without a usable CUDA driver and a CUDA build of PyTorch, a cuda device is a ConfigError naming
    the reason (``tensorstream.cuda_available()`` tells beforehand).

    Not supported on an offloaded model: changing its dtype (``model.half()``, ``model.to(torch.float16)``: the
    next forward raises ConfigError), training, ``copy.deepcopy``. A parameter used outside its module's forward
    (code reading ``module.weight`` of a module it does not call) sees the NaN placeholder. A module's output that is
    a *view* of one of its own weights (rather than a computed tensor) would alias a slot the engine reuses.

    Concurrency: each thread pins the blocks it runs independently; the budget is sized for one thread's needs, so
    threads may wait for one another's blocks. If a module with parameters of its own calls children that stream
    separately (nested blocks), several threads nesting at once at the minimum budget can exhaust it; the engine then
    raises ConfigError (field ``budget``) after 60 s instead of hanging. Give such models a larger budget.

    The model gains ``model.cleanup_tensorstream()``: it reads the streamed weights back from the store into
    ordinary memory, removes every hook and closes the engine; the model is then a plain model again (and may be
    offloaded again). Do not call it while another thread runs the model.

    **Without the model in RAM.** Build the model on the meta device and give the store's model id::

        from accelerate import init_empty_weights
        with init_empty_weights():                      # parameters on meta, buffers computed on the CPU
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("path/to/model"))
        model = tensorstream.offload(model, config, model_id="llama-7b", checkpoint="path/to/model")

    * ``model_id`` is required (ConfigError otherwise: a content id cannot be computed without the weights). The
      store must hold that model, written by an earlier ``offload`` of the real model (with that ``model_id``, or
      pass the ``fp-...`` id it reported) or by an earlier call with ``checkpoint=``; else
      ``tensorstream.errors.StoreNotFoundError`` (an IoError and a FileNotFoundError, errno ENOENT) naming the
      storage path and the id.
    * ``checkpoint``: a Hugging Face checkpoint directory (``model.safetensors.index.json`` with its shards, or one
      ``model.safetensors``) or a ``.safetensors`` file. When the store does not hold ``model_id`` yet, it is
      written from the checkpoint one block at a time (each block's tensors read with ``safetensors.safe_open`` when
      the writer reaches it), so the process holds about one block of weights, never the whole model; when the
      store holds it, the checkpoint is not opened. Checkpoint names are the model's ``state_dict()`` keys (tied
      weights saved once under any of their names, a ``base_model_prefix`` added or missing); a tensor the model
      needs and the checkpoint lacks, or of another shape, is a ConfigError naming it, before anything is written;
      other dtypes are cast to the model's. Only safetensors are read (not ``pytorch_model.bin``).
    * The model is checked against the stored one: the streamed blocks and the resident block, tensor by tensor
      (block, name, dtype, shape), in the model's order; the first difference is a ConfigError naming the tensor
      and what differs (another config, dtype or ``min_layer_size`` than the store was written with).
    * Streamed parameters get placeholders as usual; resident parameters and persistent buffers get their stored
      values. Parameters become new ``nn.Parameter`` objects (a meta tensor cannot take data in place); tied
      parameters stay tied (``tie_weights()`` is called first: ``init_empty_weights()`` unties them).
    * Every parameter must be on meta, or none (ConfigError). A *non-persistent* buffer on meta (rotary
      ``inv_freq`` when built under ``torch.device("meta")``) is saved nowhere and cannot be recovered: ConfigError
      asking to build under ``init_empty_weights()``, which keeps buffers on the CPU.
    * ``checkpoint=`` with a model that holds its weights is a ConfigError.

    ``cleanup_tensorstream()`` on such a model reads every streamed weight into memory: the model then holds all its
    weights (that needs the RAM this path avoided).

    **Encoding.** A model the store already holds is reused as stored. When it was stored with another compression
    level than ``config`` asks for, a WARNING on the ``tensorstream`` logger says what differs and how to rewrite
    it; ``rewrite=True`` writes it anew with the config's encoding (from the model's weights, or from
    ``checkpoint=``) and replaces the stored one atomically.
    """
    from .offload import offload as _offload

    return _offload(model, config, model_id=model_id, checkpoint=checkpoint, device=device, rewrite=rewrite)


def get_model_statistics(model: "nn.Module", reset: bool = False) -> Dict[str, Any]:
    """Runtime statistics of an offloaded model (counters since offload, or since the last ``reset=True`` call).

    The deployment guide's keys:

    * ``vram_usage_bytes``: weight bytes held now on the execution device: streamed blocks resident or in flight
      (slot bytes) plus the resident (never streamed) parameters.
    * ``vram_utilization``: streamed bytes held / ``budget_bytes`` (0..1).
    * ``cache_hit_rate``: share of block uses (one acquire per use by a forward pass) served from memory with no
      storage read for that use: the block stayed resident since an earlier use, or (device slots) came from the host
      tier. A block that a prefetch read just in time is not a hit: it was read.
    * ``io_throughput_mbps``: ``bytes_read`` per second of I/O busy time, in MB/s (1e6 bytes).

    More: ``bytes_read`` (read from storage as stored: compressed bytes for compressed chunks), ``bytes_delivered``
    (the same data decoded, raw bytes placed into slots), ``stall_time_s`` (time forward passes waited for blocks),
    ``prefetch_ready_rate`` (acquires that found the block resident, whether kept or prefetched just in time /
    acquires), ``prefetch_hit_rate`` (acquires served by a prefetch, resident or still in flight / acquires),
    ``acquires``, ``hits`` (resident at acquire), ``reuses`` (hits with no read for that use), ``misses``, ``prefetch_hits``, ``prefetches_issued``, ``evictions``,
    ``checksum_failures``, ``io_errors``, ``held_bytes`` (streamed resident + in flight), ``in_flight_bytes``,
    ``streamed_resident_bytes``, ``static_bytes`` (the engine's static resident set), ``lookahead`` (0 when
    nothing is prefetched), ``prefetch_off`` / ``prefetch_checks`` (ADAPTIVE times passes with and without prefetch
    8 passes after the order is known, then every 16-256 passes: True when the last check found passes without it more
    than 3 % faster; the number of checks finished),
    ``streamed_blocks`` / ``resident_blocks`` (counts), ``streamed_bytes`` / ``resident_bytes`` (parameter bytes),
    ``budget_bytes`` (effective), ``requested_budget_bytes`` (from the config, None for the default),
    ``arena_bytes``, ``backend`` (the I/O backend in use), ``model_id``, ``storage_path``, and ``blocks``: block name
    -> ``{loads, hits, prefetch_hits, evictions, bytes_read, wait_s, load_s, bytes, slot_bytes}``. Latency
    histograms: ``load_latency`` (one observation per load from storage) and ``wait_latency`` (one per wait that
    blocked a forward): ``{bounds_s, counts (per bucket, +Inf last), count, sum_s}``; ``tensorstream.metrics``
    exports them to Prometheus.

    ``reset=True`` returns the counters and then sets them to zero. Raises ConfigError for a model that is not
    offloaded.
    """
    from .offload import get_model_statistics as _stats

    return _stats(model, reset=reset)


def optimize_memory_usage(model: "nn.Module", target_utilization: float = 0.8) -> Dict[str, Any]:
    """Sets the engine's budget to ``target_utilization`` x the arena (the budget ceiling fixed at offload time).

    ``target_utilization`` in (0, 1]: below 1 shrinks the set of blocks kept resident (unpinned blocks beyond the new
    budget are evicted at once, pinned ones when released), 1 grows it back to the whole arena. The budget never
    goes below what the engine needs (the ``minimum_budget_bytes`` of the result). Outputs stay bit-identical at any
    budget; only the bytes read per pass change. To go beyond the arena, offload again with a larger
    ``vram_budget_gb``.

    Returns ``{old_budget_bytes, new_budget_bytes, arena_bytes, minimum_budget_bytes, target_utilization,
    evicted_blocks, held_bytes_before, held_bytes_after, clamped}``. Raises ConfigError (field
    ``target_utilization``) for a value outside (0, 1], or for a model that is not offloaded.
    """
    from .offload import optimize_memory_usage as _optimize

    return _optimize(model, target_utilization)


def write_trace(model: "nn.Module", path: Optional[str] = None) -> str:
    """Writes the Chrome trace of an offloaded model so far to ``path`` (default: its ``Config.trace_path``) and
    returns the path; tracing continues. ConfigError (field ``model``, ``trace_path`` or ``path``) when the model is
    not offloaded, was offloaded without tracing, or the path cannot be written."""
    from .offload import write_trace as _write_trace

    return _write_trace(model, path)
