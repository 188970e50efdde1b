"""Splitting a ``torch.nn.Module`` into blocks, the unit the engine streams.

Rules (DESIGN.md §2, §7):

1. **Layers.** Every child of an *outermost* ``nn.ModuleList`` / ``nn.Sequential`` (the model itself counts when it
   is one) that holds parameters is a block: all parameters of its subtree. This makes each transformer layer of
   any Hugging Face architecture a block (GPT-2 ``transformer.h.N``, Llama/Mistral ``model.layers.N``, OPT
   ``model.decoder.layers.N``, BERT ``bert.encoder.layer.N``, T5 ``encoder.block.N`` / ``decoder.block.N``);
   lists nested inside a layer stay inside it.
2. **Other modules.** Every remaining module with parameters of its own (``recurse=False``) is a unit. Units are
   visited in registration order: a unit whose bytes reach ``min_layer_size`` is a block of its own; smaller ones
   are grouped until the group reaches ``min_layer_size``.
3. **Shared parameters.** Units that share a ``Parameter`` object (tied embeddings and ``lm_head``, BERT's decoder
   bias, T5's shared embedding) are merged first (union-find over parameter identity), so each parameter lives in
   exactly one block: it is stored once and bound everywhere it is used.
4. **Resident blocks.** A block whose parameters total fewer than ``min_layer_size`` bytes (in particular the last,
   unfinished group) is *resident*: it is never streamed and its parameters keep their memory. Blocks of zero bytes
   are resident too. ``min_layer_size=0`` therefore streams every module that holds parameter bytes.
5. **Names** are deterministic: the module path of the block's first module in registration order
   (``"model.layers.3"``; ``"(root)"`` for the model itself). Tensor names are the parameters' qualified names (the
   first name under which ``named_parameters()`` reports a shared parameter).

Buffers are never part of a block: they stay where they are.

6. **Resident tensors** (:func:`resident_tensors`): the parameters of resident blocks, then every *persistent* buffer
   (those ``state_dict()`` saves), each once under its first qualified name. They stay in memory, and offload()
   also stores them, in one extra block named :data:`RESIDENT_BLOCK` that the engine never streams, so that a model
   built without its weights (on the meta device) gets their values back from the store. Non-persistent buffers
   (rotary ``inv_freq``, BERT's ``position_ids``) are not stored: a model computes them when it is built.

Hooks: a block is pinned while any of its *hooked modules* runs. Those are the roots of a layer block (the list
child) and every module that owns one of the block's parameters directly.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, FrozenSet, Iterable, List, Set, Tuple

import torch
from torch import nn

ROOT_NAME = "(root)"
# The store block that holds the resident tensors (module paths never contain parentheses: no clash with a layer).
RESIDENT_BLOCK = "(resident)"

__all__ = ["ParamEntry", "Block", "Partition", "partition_model", "ROOT_NAME", "RESIDENT_BLOCK", "ResidentTensor",
           "resident_tensors", "qualified_names", "buffer_registrations"]


@dataclasses.dataclass
class ParamEntry:
    """One parameter of a block: its canonical qualified name and the Parameter object itself."""

    name: str
    param: nn.Parameter
    nbytes: int


@dataclasses.dataclass
class Block:
    """A unit of streaming (or a resident group)."""

    name: str
    params: List[ParamEntry]
    modules: List[nn.Module]         # hooked modules (roots of layer blocks and direct owners of the params)
    module_names: List[str]          # their paths (first path for modules reachable under several)
    nbytes: int                      # bytes of the unique parameters
    streamed: bool
    kind: str                        # "layer" (list child) or "group" (other modules)
    index: int = -1                  # position in Partition.blocks


@dataclasses.dataclass
class Partition:
    """The blocks of a model, in registration order."""

    blocks: List[Block]

    @property
    def streamed(self) -> List[Block]:
        return [b for b in self.blocks if b.streamed]

    @property
    def resident(self) -> List[Block]:
        return [b for b in self.blocks if not b.streamed]

    @property
    def streamed_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks if b.streamed)

    @property
    def resident_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks if not b.streamed)

    def module_blocks(self) -> Dict[int, Block]:
        """id(module) -> the streamed block that module's hooks pin."""
        out: Dict[int, Block] = {}
        for block in self.streamed:
            for module in block.modules:
                out[id(module)] = block
        return out

    def pinned_chains(self, model: nn.Module) -> List[FrozenSet[int]]:
        """The sets of streamed blocks (by index) one thread can hold pinned at once.

        A hooked module keeps its block pinned for its whole forward, so while a hooked descendant of another block
        runs, both are pinned (BERT's ``cls.predictions`` owns a bias and calls ``transform.dense``). Each set here is
        the blocks hooked along one path from the root; the budget must hold the largest such set.
        """
        module_block = self.module_blocks()
        chains: Set[FrozenSet[int]] = set()
        seen: Set[Tuple[int, FrozenSet[int]]] = set()

        def visit(module: nn.Module, held: FrozenSet[int], path: Tuple[int, ...]) -> None:
            key = (id(module), held)
            if key in seen or id(module) in path:
                return
            seen.add(key)
            block = module_block.get(id(module))
            if block is not None:
                held = held | {block.index}
                chains.add(held)
            for child in module.children():
                visit(child, held, path + (id(module),))

        visit(model, frozenset(), ())
        return sorted(chains, key=lambda c: sorted(c))


def _nbytes(param: torch.Tensor) -> int:
    return param.numel() * param.element_size()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclasses.dataclass
class _Unit:
    order: int
    kind: str                        # "layer" | "module"
    path: str
    modules: List[Tuple[str, nn.Module]]
    params: List[nn.Parameter]


class _UnionFind:
    def __init__(self, count: int) -> None:
        self.parent = list(range(count))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The unit registered first is the representative: it names the merged block.
            self.parent[max(ra, rb)] = min(ra, rb)


def _collect_units(model: nn.Module) -> List[_Unit]:
    units: List[_Unit] = []
    seen: Set[int] = set()

    def add_unit(kind: str, path: str, modules: List[Tuple[str, nn.Module]], params: Iterable[nn.Parameter]) -> None:
        unique: List[nn.Parameter] = []
        ids: Set[int] = set()
        for p in params:
            if id(p) not in ids:
                ids.add(id(p))
                unique.append(p)
        if unique:
            units.append(_Unit(len(units), kind, path, modules, unique))

    def visit(path: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        own = list(module.parameters(recurse=False))
        if own:
            add_unit("module", path, [(path, module)], own)
        is_list = isinstance(module, (nn.ModuleList, nn.Sequential))
        for child_name, child in module.named_children():
            child_path = _join(path, child_name)
            if is_list and id(child) not in seen and any(True for _ in child.parameters()):
                # A layer: its whole subtree. Modules in it are claimed here (also when reachable elsewhere).
                subtree = [(p, m) for p, m in child.named_modules(prefix=child_path)]
                for _p, m in subtree:
                    seen.add(id(m))
                hooked = [(child_path, child)] + [(p, m) for p, m in subtree
                                                  if m is not child and any(True for _ in m.parameters(recurse=False))]
                add_unit("layer", child_path, hooked, child.parameters())
            else:
                visit(child_path, child)

    visit("", model)
    return units


def partition_model(model: nn.Module, min_layer_size: int) -> Partition:
    """Partitions ``model`` into blocks by the rules of this module's docstring."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    canonical: Dict[int, str] = {}
    for name, p in model.named_parameters():
        canonical.setdefault(id(p), name)

    units = _collect_units(model)
    uf = _UnionFind(len(units))
    owner: Dict[int, int] = {}
    for unit in units:
        for p in unit.params:
            if id(p) in owner:
                uf.union(owner[id(p)], unit.order)
            else:
                owner[id(p)] = unit.order

    merged: Dict[int, List[_Unit]] = {}
    for unit in units:
        merged.setdefault(uf.find(unit.order), []).append(unit)

    def make_block(groups: List[List[_Unit]], kind: str) -> Block:
        params: List[ParamEntry] = []
        ids: Set[int] = set()
        modules: List[nn.Module] = []
        module_names: List[str] = []
        module_ids: Set[int] = set()
        for group in groups:
            for unit in group:
                for p in unit.params:
                    if id(p) not in ids:
                        ids.add(id(p))
                        params.append(ParamEntry(canonical[id(p)], p, _nbytes(p)))
                for path, m in unit.modules:
                    if id(m) not in module_ids:
                        module_ids.add(id(m))
                        modules.append(m)
                        module_names.append(path or ROOT_NAME)
        nbytes = sum(e.nbytes for e in params)
        name = groups[0][0].path or ROOT_NAME
        return Block(name=name, params=params, modules=modules, module_names=module_names, nbytes=nbytes,
                     streamed=False, kind=kind)

    blocks: List[Block] = []
    pending: List[List[_Unit]] = []
    pending_bytes = 0
    for rep in sorted(merged):
        group = merged[rep]
        group_bytes = sum(_nbytes(p) for p in {id(p): p for u in group for p in u.params}.values())
        if any(u.kind == "layer" for u in group):
            block = make_block([group], "layer")
            block.streamed = block.nbytes > 0 and block.nbytes >= min_layer_size
            blocks.append(block)
        elif group_bytes >= min_layer_size:
            block = make_block([group], "group")
            block.streamed = block.nbytes > 0
            blocks.append(block)
        else:
            pending.append(group)
            pending_bytes += group_bytes
            if pending_bytes >= min_layer_size:
                block = make_block(pending, "group")
                block.streamed = block.nbytes > 0
                blocks.append(block)
                pending, pending_bytes = [], 0
    if pending:
        blocks.append(make_block(pending, "group"))  # under min_layer_size: resident
    for i, block in enumerate(blocks):
        block.index = i
    return Partition(blocks)


def describe(partition: Partition) -> List[Dict[str, object]]:
    """A JSON-friendly summary (stored in the store's metadata and logged in debug mode)."""
    return [{"name": b.name, "kind": b.kind, "streamed": b.streamed, "nbytes": b.nbytes,
             "tensors": [e.name for e in b.params], "modules": list(b.module_names)} for b in partition.blocks]


# ---- resident tensors ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ResidentTensor:
    """A tensor that stays in memory and goes into the store's :data:`RESIDENT_BLOCK`."""

    name: str            # first qualified name (the store's tensor name, a ``state_dict()`` key)
    tensor: torch.Tensor  # the Parameter or buffer itself
    kind: str            # "parameter" | "buffer"


def buffer_registrations(model: nn.Module) -> List[Tuple[str, nn.Module, str, torch.Tensor, bool]]:
    """Every buffer registration: (qualified name, owning module, attribute, tensor, persistent), in
    ``named_modules`` order; a buffer shared by several modules appears once per registration."""
    out: List[Tuple[str, nn.Module, str, torch.Tensor, bool]] = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        for key, buf in module._buffers.items():
            if buf is not None:
                out.append((_join(prefix, key), module, key, buf, key not in module._non_persistent_buffers_set))
    return out


def qualified_names(model: nn.Module) -> Dict[int, List[str]]:
    """id(parameter or buffer) -> every qualified name it is registered under, first name first."""
    out: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    for name, _module, _key, buf, _persistent in buffer_registrations(model):
        names = out.setdefault(id(buf), [])
        if name not in names:
            names.append(name)
    return out


def resident_tensors(model: nn.Module, partition: Partition) -> List[ResidentTensor]:
    """The parameters of the resident blocks (in block order), then the persistent buffers (first registration
    order), each tensor once (rule 6)."""
    out: List[ResidentTensor] = []
    seen: Set[int] = set()
    for block in partition.resident:
        for e in block.params:
            if id(e.param) not in seen:
                seen.add(id(e.param))
                out.append(ResidentTensor(e.name, e.param, "parameter"))
    persistent = {id(buf) for _n, _m, _k, buf, keep in buffer_registrations(model) if keep}
    for name, _module, _key, buf, _keep in buffer_registrations(model):
        if id(buf) in persistent and id(buf) not in seen:
            seen.add(id(buf))
            out.append(ResidentTensor(name, buf, "buffer"))
    return out
