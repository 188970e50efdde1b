"""What ``tensorstream serve MODEL`` serves: the model (offloaded), its tokenizer and its name.

MODEL is a checkpoint folder (or a hub id in the local Hugging Face cache), loaded with
:func:`tensorstream.from_pretrained` (written into the store on first use, found there afterwards), or the id of a
model already in the store (``tensorstream convert --model-id ID``), built from the config and class the store keeps
in its metadata: the replicas of a deployment serve a store one job wrote, without the checkpoint's weights. The
tokenizer comes from the checkpoint folder, or from ``--tokenizer``; without one the server takes token-id prompts
only.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from typing import Any, Optional, Tuple

from ..config import Config
from ..errors import ConfigError

logger = logging.getLogger("tensorstream.serve")

__all__ = ["ServeOptions", "load_model", "load_tokenizer"]


@dataclasses.dataclass
class ServeOptions:
    """Everything ``tensorstream serve`` takes (docs/serving.md). ``None`` fields fall back to the environment
    (TENSORSTREAM_STORAGE_PATH, TENSORSTREAM_VRAM_BUDGET, ...) as :class:`tensorstream.Config` does."""

    model: str
    storage_path: Optional[str] = None
    budget_gb: Optional[float] = None
    served_name: Optional[str] = None
    tokenizer: Optional[str] = None
    dtype: Optional[str] = None
    max_batch: int = 16
    kv_cache_gb: float = 0.5
    max_batch_tokens: int = 512
    verify: bool = True

    def config(self) -> Config:
        from ..torch.pretrained import default_storage_path

        kwargs: dict = {}
        if self.budget_gb is not None:
            kwargs["vram_budget_gb"] = self.budget_gb
        storage = self.storage_path or os.environ.get("TENSORSTREAM_STORAGE_PATH") or default_storage_path()
        return Config(storage_path=storage, **kwargs)


def _is_store_model(options: ServeOptions, config: Config) -> bool:
    if os.path.exists(options.model):
        return False
    from ..torch.offload import store_holds

    return store_holds(config.storage_path, options.model)


def _stored_min_layer_size(store: Any) -> int:
    """The min_layer_size the stored model was partitioned with: from its metadata, else (older stores) the size of
    its smallest streamed block, which partitions it the same way."""
    from ..torch.offload import MIN_LAYER_KEY
    from ..torch.partition import RESIDENT_BLOCK

    text = store.metadata.get(MIN_LAYER_KEY, "")
    if text.isdigit():
        return int(text)
    sizes: dict = {}
    for name in store.tensor_names():
        info = store.info(name)
        if info["block_name"] != RESIDENT_BLOCK:
            sizes[info["block_name"]] = sizes.get(info["block_name"], 0) + info["nbytes"]
    return min(sizes.values()) if sizes else 1 << 20


def _build_from_store(model_id: str, config: Config) -> Any:
    """The model of store entry ``model_id``, built without weights from the config and class in its metadata.
    ``config.min_layer_size`` is set to the one the store was partitioned with."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    from ..store import _torch_dtype, open_model

    with open_model(config.storage_path, model_id) as store:
        metadata = dict(store.metadata)
        # The stored tensors' dtype (convert --dtype may have cast them), not the config's.
        dtypes = [store.info(name)["dtype"] for name in store.tensor_names()]
        config.min_layer_size = _stored_min_layer_size(store)
    floats = [name for name in dtypes if name.startswith(("float", "bfloat"))]
    class_path = metadata.get("tensorstream.model_class")
    config_json = metadata.get("tensorstream.hf_config")
    if not class_path or not config_json:
        raise ConfigError(f"model '{model_id}' in {config.storage_path} was stored without its transformers config "
                          "and class (written by offload() of a model that is not a Hugging Face model?); serve its "
                          "checkpoint folder instead", field="model")
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"model '{model_id}': class {class_path} cannot be imported ({error})",
                          field="model") from None
    values = json.loads(config_json)
    hf_config = AutoConfig.for_model(values.pop("model_type"), **values)
    dtype = _torch_dtype(max(set(floats), key=floats.count) if floats else "float32")  # the store's own mapping
    with init_empty_weights():
        model = cls._from_config(hf_config, dtype=dtype)
    model.eval()
    model.generation_config = GenerationConfig.from_model_config(hf_config)
    return model


def load_model(options: ServeOptions) -> Tuple[Any, str, Optional[str]]:
    """(offloaded model, its store id, its checkpoint folder or None). Waits for the store to be written when
    the checkpoint is new to it (from_pretrained's background write), so that the model serves from the store."""
    from ..torch import from_pretrained, offload
    from ..torch.offload import _state

    config = options.config()
    if _is_store_model(options, config):
        model = offload(_build_from_store(options.model, config), config, model_id=options.model)
        checkpoint = None
    else:
        model = from_pretrained(options.model, config, torch_dtype=options.dtype)  # it resolves dtype names
        from ..torch.pretrained import resolve_checkpoint

        checkpoint = resolve_checkpoint(options.model)
    state = _state(model)  # finishes a first store write
    return model, state.model_id, checkpoint


def load_tokenizer(options: ServeOptions, checkpoint: Optional[str]) -> Any:
    """The tokenizer of ``--tokenizer``, else of the checkpoint folder, else None (token-id prompts only)."""
    source = options.tokenizer or checkpoint
    if source is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        if options.tokenizer is not None:
            raise ConfigError(f"tokenizer {options.tokenizer} cannot be loaded ({error})", field="tokenizer") from None
        logger.warning("serve: no tokenizer in %s (%s): only token-id prompts will be served", source, error)
        return None
