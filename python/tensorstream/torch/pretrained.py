"""``tensorstream.from_pretrained``: a Hugging Face checkpoint to a streamed model in one call.

Steps: resolve the checkpoint folder (a local folder, or a hub id already in huggingface_hub's local cache: nothing
is downloaded); read its ``config.json``; build the model without weights (``accelerate.init_empty_weights``, so
buffers such as rotary frequencies are computed on the CPU as ``from_pretrained`` does); derive a model id from the
checkpoint; ``offload(model, config, model_id=..., checkpoint=folder)``, which writes the store from the checkpoint
one block at a time when the store does not hold that id yet (checkpoint.py), and returns the model in eval mode,
ready for ``generate()``.

The model id is ``<folder name>-<16 hex digits>``: a hash of the checkpoint's index (or file list), each weight
file's size and modification time, ``config.json``, the dtype the weights are stored in, the model class, the
store encoding (compression level) and the block partition (``min_layer_size``). A second call with the same inputs finds the store and writes nothing; a
changed checkpoint, another dtype or another compression level is written anew under its own id (remove old ones
with ``tensorstream.Storage(path).remove(id)`` or ``cleanup_orphaned_files``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from typing import Any, Dict, Optional, Tuple, Union

from ..config import Config
from ..errors import ConfigError
from .checkpoint import INDEX_NAME, SINGLE_NAME

logger = logging.getLogger("tensorstream")

__all__ = ["from_pretrained", "convert", "ConvertResult", "checkpoint_model_id", "resolve_checkpoint",
           "default_storage_path"]


def default_storage_path() -> str:
    """Where the store lives when neither the Config nor TENSORSTREAM_STORAGE_PATH says."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tensorstream", "store")


def resolve_checkpoint(path: Union[str, "os.PathLike[str]"], revision: Optional[str] = None) -> str:
    """A local checkpoint folder for ``path``: the folder itself, or a hub id's snapshot in the local cache."""
    text = os.fspath(path)
    if os.path.isdir(text):
        return os.path.abspath(text)
    if os.path.exists(text):
        raise ConfigError(f"checkpoint {text} is a file: from_pretrained takes the checkpoint folder (with "
                          "config.json); for a bare .safetensors file build the model yourself and use "
                          "offload(..., checkpoint=)", field="path")
    looks_like_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", text) is not None
    if not looks_like_hub_id:
        raise ConfigError(f"checkpoint folder {text} does not exist", field="path")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(text, revision=revision, local_files_only=True)
    except ImportError:
        reason = "huggingface_hub is not installed"
    except Exception as error:  # noqa: BLE001 - the hub raises several types for "not in the cache"
        reason = f"{type(error).__name__}: {error}"
    raise ConfigError(f"'{text}' is neither a local folder nor a hub id in the local Hugging Face cache ({reason}); "
                      "download it first (huggingface-cli download) or pass the checkpoint folder", field="path")


def _weight_files(root: str) -> "list[str]":
    index = os.path.join(root, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ConfigError(f"checkpoint index {index} cannot be read ({error})", field="checkpoint") from None
        return [INDEX_NAME] + shards
    if os.path.isfile(os.path.join(root, SINGLE_NAME)):
        return [SINGLE_NAME]
    raise ConfigError(f"checkpoint folder {root} has neither {INDEX_NAME} nor {SINGLE_NAME} (only safetensors "
                      "checkpoints are read; pytorch_model.bin is not: save the model with safetensors)",
                      field="checkpoint")


def checkpoint_model_id(root: str, dtype: Any, model_class: type, compression_level: int,
                        min_layer_size: int = 1 << 20) -> str:
    """The store id of ``root`` loaded as ``model_class`` in ``dtype``, stored at ``compression_level`` with blocks
    partitioned by ``min_layer_size`` (see the module docstring). Cheap: file metadata, the index and config.json;
    no weight is read."""
    digest = hashlib.sha256()
    for name in _weight_files(root):
        file = os.path.join(root, name)
        try:
            status = os.stat(file)
        except FileNotFoundError:
            raise ConfigError(f"checkpoint file {file}, which the index names, does not exist (a missing shard)",
                              field="checkpoint") from None
        digest.update(f"{name}\0{status.st_size}\0{status.st_mtime_ns}\0".encode())
        if name == INDEX_NAME:
            with open(file, "rb") as f:
                digest.update(f.read())
    config_file = os.path.join(root, "config.json")
    if os.path.isfile(config_file):
        with open(config_file, "rb") as f:
            digest.update(f.read())
    digest.update(f"\0{dtype}\0{model_class.__module__}.{model_class.__qualname__}\0{compression_level}"
                  f"\0{min_layer_size}".encode())
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(os.path.normpath(root))).strip(".-")[:64] or "model"
    return f"{stem}-{digest.hexdigest()[:16]}"


def _resolve_dtype(torch_dtype: Any, hf_config: Any) -> Any:
    import torch

    if torch_dtype is None or torch_dtype == "auto":  # transformers' default: the config's dtype, else float32
        torch_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
    if isinstance(torch_dtype, str):
        resolved = getattr(torch, torch_dtype.replace("torch.", ""), None)
        if not isinstance(resolved, torch.dtype):
            raise ConfigError(f"torch_dtype {torch_dtype!r} is not a torch dtype (e.g. 'bfloat16', torch.float16)",
                              field="torch_dtype")
        torch_dtype = resolved
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ConfigError(f"torch_dtype {torch_dtype!r} must be a floating-point torch dtype", field="torch_dtype")
    return torch_dtype


def _resolve_class(model_class: Any, hf_config: Any) -> type:
    import transformers

    if model_class is not None:
        if not isinstance(model_class, type):
            raise ConfigError(f"model_class must be a class (e.g. AutoModelForCausalLM), got {model_class!r}",
                              field="model_class")
        return model_class
    for name in getattr(hf_config, "architectures", None) or []:
        found = getattr(transformers, name, None)
        if isinstance(found, type):
            return found
    return transformers.AutoModel


def _prepare(path: Union[str, "os.PathLike[str]"], config: Optional[Config], torch_dtype: Any, model_class: Any,
             model_id: Optional[str], hf_kwargs: Dict[str, Any]) -> Tuple[Any, Config, str, str]:
    """(model built without weights, config, model id, checkpoint folder)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    if config is None:
        config = Config(storage_path=os.environ.get("TENSORSTREAM_STORAGE_PATH") or default_storage_path())
    if not isinstance(config, Config):
        raise ConfigError(f"config must be a tensorstream.Config, got {type(config).__name__}", field="config")
    root = resolve_checkpoint(path, hf_kwargs.get("revision"))
    try:
        hf_config = AutoConfig.from_pretrained(root, **hf_kwargs)
    except (OSError, ValueError) as error:
        raise ConfigError(f"checkpoint {root}: config.json cannot be read as a transformers config ({error})",
                          field="checkpoint") from None
    dtype = _resolve_dtype(torch_dtype, hf_config)
    cls = _resolve_class(model_class, hf_config)
    build = getattr(cls, "_from_config", None) or cls.from_config  # a model class, or an Auto* class
    with init_empty_weights():
        model = build(hf_config, dtype=dtype)
    model.eval()  # as transformers' from_pretrained returns it (dropout off)
    if getattr(model, "can_generate", lambda: False)() and os.path.isfile(os.path.join(root, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(root)
    if model_id is None:
        model_id = checkpoint_model_id(root, dtype, type(model), config.store_compression_level, config.min_layer_size)
    return model, config, model_id, root


def from_pretrained(path: Union[str, "os.PathLike[str]"], config: Optional[Config] = None, *,
                    torch_dtype: Any = None, model_class: Any = None, model_id: Optional[str] = None,
                    device: Any = None, rewrite: bool = False, **hf_kwargs: Any) -> Any:
    """See :func:`tensorstream.from_pretrained`."""
    from .checkpoint import Checkpoint, plan_blocks
    from .first_pass import CheckpointPass
    from .offload import bind_model, plan_offload, store_holds, store_model

    model, config, model_id, root = _prepare(path, config, torch_dtype, model_class, model_id, hf_kwargs)
    plan = plan_offload(model, config, model_id, root, device, rewrite)
    stored = store_holds(config.storage_path, model_id) and not rewrite
    if stored or plan.placement.device_slots or not plan.partition.streamed:
        return bind_model(model, plan, store_model(model, plan))  # offload()'s three stages
    # Not in the store yet: write it on a thread and serve the first passes from the checkpoint (first_pass.py).
    checkpoint_plan = plan_blocks(Checkpoint(root), model, plan.partition, plan.resident)
    return CheckpointPass(model, plan, checkpoint_plan).start(model)


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` did."""

    model_id: str
    storage_path: str
    checkpoint: str
    outcome: str          # "published", "replaced" or "already_existed" (nothing written)
    raw_bytes: int        # the model's bytes in memory (after the dtype cast)
    stored_bytes: int     # its data file
    seconds: float        # wall time of the write (0 when nothing was written)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def convert(path: Union[str, "os.PathLike[str]"], config: Optional[Config] = None, *, torch_dtype: Any = None,
            model_class: Any = None, model_id: Optional[str] = None, replace: bool = False,
            **hf_kwargs: Any) -> ConvertResult:
    """Writes checkpoint ``path`` into the store as :func:`from_pretrained` would (same model id for the same
    settings, so a later ``from_pretrained`` writes nothing), without running or keeping the model. ``replace``:
    rewrite it even when the store holds it (e.g. with another compression level under a given ``model_id``)."""
    from ..store import open_model
    from .offload import plan_offload, store_model

    model, config, model_id, root = _prepare(path, config, torch_dtype, model_class, model_id, hf_kwargs)
    plan = plan_offload(model, config, model_id, root, None, rewrite=replace)
    started = time.perf_counter()
    stored = store_model(model, plan)
    seconds = time.perf_counter() - started if stored.outcome != "already_existed" else 0.0
    with open_model(config.storage_path, stored.model_id) as store:
        raw = sum(store.info(name)["nbytes"] for name in store.tensor_names())
        data_size = store.data_size
    return ConvertResult(model_id=stored.model_id, storage_path=str(config.storage_path), checkpoint=root,
                         outcome=stored.outcome, raw_bytes=raw, stored_bytes=data_size, seconds=seconds)
