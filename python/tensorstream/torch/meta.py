"""Offloading a model built without its weights: every parameter on the meta device.

``offload(model, config, model_id="name")`` accepts a model built under ``accelerate.init_empty_weights()`` or
``torch.device("meta")`` (for instance ``AutoModelForCausalLM.from_config(cfg)``): its weights come from the store
(which must hold ``name``, or be written first from ``checkpoint=``), so the model never needs to fit in RAM.
This module holds the checks and the swap that gives such a model real tensors:

* :func:`check_meta_model`: every parameter on meta or none (mixed: ConfigError), a ``model_id`` (a content id
  cannot be computed without the weights), and no non-persistent buffer on meta (its value is in no store or
  checkpoint: the model computes it when built, which ``init_empty_weights()`` lets it do on the CPU).
* :func:`check_against_store`: the store's tensors are exactly the model's (blocks, names, dtypes, shapes), in the
  model's order: streamed blocks in partition order, then the resident block; the first difference is a ConfigError
  naming the tensor and what differs.
* :class:`Materialization`: new CPU Parameters (placeholders for streamed ones, stored values for resident ones)
  and buffers, swapped into every module that registers the old ones when offload commits, and swapped back if the
  commit fails (the model is then exactly as it was: on meta).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError
from .hooks import placeholder
from .partition import RESIDENT_BLOCK, Partition, ResidentTensor, buffer_registrations

__all__ = ["params_on_meta", "check_meta_model", "check_against_store", "expected_tensors", "Materialization"]


def params_on_meta(model: nn.Module) -> bool:
    """True when every parameter is on the meta device, False when none is (or there are none); ConfigError when
    some are and some are not."""
    on_meta: Optional[Tuple[str, torch.device]] = None
    real: Optional[Tuple[str, torch.device]] = None
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            on_meta = on_meta or (name, param.device)
        else:
            real = real or (name, param.device)
        if on_meta and real:
            raise ConfigError(f"the model mixes parameters on the meta device ('{on_meta[0]}') with parameters that "
                              f"hold data ('{real[0]}' on {real[1]}): offload() takes a model whose parameters are "
                              "all real (it writes them to the store) or all on meta (it reads them from the store); "
                              "load or drop the partial weights first", field="model")
    return on_meta is not None


def check_meta_model(model: nn.Module, model_id: Optional[str]) -> None:
    """The checks a meta model must pass before anything else happens (ConfigError)."""
    if model_id is None:
        raise ConfigError("a model on the meta device needs model_id=: its weights come from the store, and the "
                          "content id (fp-...) that model_id=None would use cannot be computed without the weights. "
                          "Pass the id the store holds the model under (the name, or the fp-... id an earlier "
                          "offload of the real model reported in get_model_statistics()['model_id']), and "
                          "checkpoint= to write it from a Hugging Face checkpoint when it is not there yet",
                          field="model_id")
    lost = [name for name, _m, _k, buf, persistent in buffer_registrations(model)
            if not persistent and buf.device.type == "meta"]
    if lost:
        listed = ", ".join(f"'{n}'" for n in lost[:4]) + (f" and {len(lost) - 4} more" if len(lost) > 4 else "")
        raise ConfigError(f"non-persistent buffer {listed} of the model is on the meta device: such buffers are "
                          "computed when the model is built and saved nowhere (neither in the store nor in a "
                          "checkpoint), so their values cannot be recovered. Build the model under "
                          "accelerate.init_empty_weights() (which keeps buffers on the CPU) instead of "
                          "torch.device('meta')", field="model")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def expected_tensors(partition: Partition, resident: List[ResidentTensor]) -> List[Tuple[str, str, str, List[int]]]:
    """(block, tensor, dtype, shape) of every tensor the store must hold, in the model's order."""
    out = [(b.name, e.name, _dtype_name(e.param.dtype), list(e.param.shape)) for b in partition.streamed
           for e in b.params]
    out += [(RESIDENT_BLOCK, r.name, _dtype_name(r.tensor.dtype), list(r.tensor.shape)) for r in resident]
    return out


def check_against_store(store: Any, partition: Partition, resident: List[ResidentTensor], storage_path: str) -> None:
    """ConfigError (field ``model``) naming the first difference between the model and the stored model ``store``
    (a :class:`tensorstream.ModelStore`): a tensor missing on either side, in another block, of another dtype or of
    another shape. Block order is not compared (defragment_storage reorders blocks)."""
    where = f"model '{store.model_id}' in {storage_path}"
    infos = {name: store.info(name) for name in store.tensor_names()}
    has_resident_block = RESIDENT_BLOCK in store.block_names()

    def mismatch(detail: str) -> ConfigError:
        return ConfigError(f"{where} does not match this model: {detail}. Is this the model that was stored under "
                           "that id (same architecture, config, dtype and min_layer_size)?", field="model")

    expected = expected_tensors(partition, resident)
    for block, name, dtype, shape in expected:
        info = infos.get(name)
        if info is None:
            if block == RESIDENT_BLOCK and not has_resident_block:
                raise ConfigError(
                    f"{where} has no '{RESIDENT_BLOCK}' block, so it cannot give this model the values of the "
                    f"tensors it keeps in memory (first: '{name}'): an older TensorStream wrote it. Write it again: "
                    f"tensorstream.Storage({storage_path!r}).remove({store.model_id!r}), then offload the real model "
                    "with that model_id, or this model with checkpoint=", field="model")
            raise mismatch(f"the model's tensor '{name}' (block '{block}') is not in the store")
        if info["block_name"] != block:
            raise mismatch(f"tensor '{name}' is in block '{block}' of the model but in block '{info['block_name']}' "
                           "of the store")
        if info["dtype"] != dtype:
            raise mismatch(f"tensor '{name}' has dtype {dtype} in the model but {info['dtype']} in the store")
        if list(info["shape"]) != shape:
            raise mismatch(f"tensor '{name}' has shape {shape} in the model but {list(info['shape'])} in the store")
    names = {name for _b, name, _d, _s in expected}
    for name, info in infos.items():
        if name not in names:
            raise mismatch(f"the store holds tensor '{name}' (block '{info['block_name']}'), which the model does not "
                           "have")


def _parameter(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    new = nn.Parameter(data, requires_grad=old.requires_grad)
    new.__dict__.update(old.__dict__)  # attributes libraries set on parameters (_is_hf_initialized, ...)
    return new


class Materialization:
    """Real tensors for a meta model, prepared without touching the model; :meth:`apply` swaps them in.

    Streamed parameters get a new CPU Parameter holding a placeholder (the hooks bind slot views to it), resident
    parameters a Parameter holding their stored value, persistent buffers their stored value. ``partition``'s
    entries are re-pointed at the new Parameters (the runtime binds those). Tied parameters stay tied: one new
    Parameter replaces the old one under every name.
    """

    def __init__(self, partition: Partition, resident: List[ResidentTensor], values: Dict[str, torch.Tensor]) -> None:
        self._new: Dict[int, torch.Tensor] = {}
        self._old: List[torch.Tensor] = []  # keeps the replaced tensors alive, so their ids stay unique
        self._undo: List[Tuple[Dict[str, Any], str, torch.Tensor]] = []
        with torch.inference_mode(False), torch.no_grad():
            for block in partition.blocks:
                for entry in block.params:
                    if id(entry.param) in self._new:
                        entry.param = self._new[id(entry.param)]
                        continue
                    old = entry.param
                    if block.streamed:
                        data = placeholder(old.dtype, tuple(old.shape))
                    else:
                        data = values[entry.name]
                    entry.param = self._replace(old, _parameter(old, data))
            for r in resident:
                if r.kind == "buffer":
                    self._replace(r.tensor, values[r.name])

    def _replace(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        self._new[id(old)] = new
        self._old.append(old)
        return new

    def apply(self, model: nn.Module) -> None:
        """Swaps the new tensors into every module that registers an old one."""
        try:
            for module in model.modules():
                for table in (module._parameters, module._buffers):
                    for key, value in list(table.items()):
                        new = self._new.get(id(value)) if value is not None else None
                        if new is not None:
                            self._undo.append((table, key, value))
                            table[key] = new
        except BaseException:
            self.undo()
            raise

    def undo(self) -> None:
        """Puts the meta tensors back (the model is as it was before :meth:`apply`)."""
        while self._undo:
            table, key, old = self._undo.pop()
            table[key] = old
