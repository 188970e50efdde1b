"""The arena: the memory the engine streams blocks into, owned by PyTorch, and how big it is.

The arena is one ``uint8`` CPU tensor, 4 KiB aligned (O_DIRECT reads land in it straight from storage). PyTorch
allocates it lazily (``torch.empty``): pages become resident only when a block is first loaded into them.

Budget (bytes of streamed weights held at once, resident plus in flight; DESIGN.md §6):

* ``config.vram_budget_gb`` when set, else :data:`DEFAULT_BUDGET_FRACTION` (a quarter) of the streamed bytes;
* never above the streamed blocks' slot bytes all together (more could never be used; the arena would only reserve
  address space);
* never below what the engine needs to make progress: the largest set of blocks one thread keeps pinned at once
  (for most models the largest block; see ``Partition.pinned_chains``). A smaller request is raised to that and a
  WARNING is logged on the ``tensorstream`` logger. Prefetches never pin, so the streaming ring of the residency
  presets (docs/configuration.md) does not need to fit: with less, the engine simply prefetches less.

The arena holds exactly the budget, plus slack when one thread pins several blocks at once (one largest block per
extra nesting level, so a block always finds a contiguous slot however the pinned ones are placed). The arena is
the ceiling ``optimize_memory_usage`` can grow the budget back to.
"""

from __future__ import annotations

import ctypes
import dataclasses
from typing import Iterable, List, Optional, Sequence

import torch

ALIGNMENT = 4096
DEFAULT_BUDGET_FRACTION = 0.25

__all__ = ["Arena", "BudgetPlan", "plan_budget", "external_bytes", "ALIGNMENT", "DEFAULT_BUDGET_FRACTION"]


def align_up(value: int, alignment: int = ALIGNMENT) -> int:
    return (value + alignment - 1) // alignment * alignment


def slot_bytes(slot_size: int) -> int:
    """Bytes a block takes in the arena, as the engine counts them (at least one 4 KiB page)."""
    return max(align_up(slot_size), ALIGNMENT)


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    requested_bytes: Optional[int]  # from the config (None: default)
    default_bytes: int              # the default share of the streamed bytes
    minimum_bytes: int              # what one thread may hold pinned at once
    budget_bytes: int               # effective budget handed to the engine
    arena_bytes: int                # budget + room for nested chains + slack_bytes
    raised: bool                    # the requested (or default) budget was below the minimum
    capped: bool                    # the requested budget exceeded every streamed block together: lowered to that
    slack_bytes: int = 0            # arena beyond the budget so that unequal blocks find contiguous slots


def plan_budget(requested_bytes: Optional[int], slots: Sequence[int], chains: Iterable[Iterable[int]],
                placement_slack: bool = False) -> BudgetPlan:
    """The effective budget and arena size for blocks of ``slots`` bytes (engine slot sizes, by block position) and
    the sets of block positions one thread can hold pinned together (``chains``).

    ``placement_slack`` (host arenas): when blocks differ in size and not all fit, the arena gets two largest blocks
    of room beyond the budget. The engine still holds at most the budget, but a slot must be contiguous: in an arena
    of exactly the budget, an lm_head arriving among layer-sized holes evicts two or three layers to get one hole.
    Measured (benchmarks/residency.py's mixed model, 0.75 of the model in budget, bytes per pass / optimum): no
    slack 1.37x (NONE) and 1.14x (NEXT_LAYER); one largest block 1.02x and 1.04-1.06x; two 1.02x and 1.00x (the
    block in flight needs its own hole). The engine gives the pages of freed slots back to the OS (engine.cpp), so
    the slack costs address space, not memory. Device arenas get none: there the arena is what is allocated."""
    sizes = [slot_bytes(s) for s in slots]
    total = sum(sizes)
    largest = max(sizes, default=ALIGNMENT)
    minimum = largest
    depth = 1
    for chain in chains:
        members = list(chain)
        minimum = max(minimum, sum(sizes[i] for i in members))
        depth = max(depth, len(members))
    default = align_up(max(int(total * DEFAULT_BUDGET_FRACTION), 1))
    wanted = default if requested_bytes is None else requested_bytes
    raised = wanted < minimum
    capped = wanted > max(total, minimum)
    budget = minimum if raised else min(wanted, max(total, minimum))
    slack = 2 * largest if placement_slack and len(set(sizes)) > 1 and budget < total else 0
    arena = align_up(budget + (depth - 1) * largest + slack)
    return BudgetPlan(requested_bytes, default, minimum, budget, arena, raised, capped, slack)


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def _advise_huge_pages(address: int, nbytes: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


class Arena:
    """``nbytes`` of host memory in a uint8 tensor (allocated lazily by the OS), 2 MiB aligned and advised for
    transparent huge pages where the kernel allows them.

    Why huge pages: an O_DIRECT read lands in the arena by DMA, and the device takes the destination as a list of
    physically contiguous segments. With 4 KiB pages a 4 MiB read is up to 1024 scattered segments, which the block
    layer splits into several smaller requests (about 1.5 MiB on the development VM); with 2 MiB pages it is two, and
    the device sees whole 4 MiB requests. Measured on that VM: cold reads 1.62 -> 2.37 GB/s
    (benchmarks/engine_read.py, "THP arena" arm)."""

    def __init__(self, nbytes: int, device: Optional[torch.device] = None) -> None:
        """On a GPU (``device`` cuda:N) the memory comes from torch's allocator on that device, so
        ``torch.cuda.memory_allocated`` counts it, 4 KiB aligned (GPUDirect reads land at slot offsets)."""
        self.nbytes = int(nbytes)
        on_host = device is None or device.type == "cpu"
        alignment = HUGE_PAGE if on_host else ALIGNMENT
        self._raw = torch.empty(self.nbytes + alignment, dtype=torch.uint8, device=device)
        offset = (-self._raw.data_ptr()) % alignment
        self.tensor = self._raw[offset:offset + self.nbytes]
        self.address = self.tensor.data_ptr()
        self.huge_pages = on_host and self.nbytes > 0 and _advise_huge_pages(self.address, self.nbytes)

    def contains(self, address: int, nbytes: int) -> bool:
        return self.address <= address and address + nbytes <= self.address + self.nbytes

    def bytes_at(self, address: int, nbytes: int) -> torch.Tensor:
        """A uint8 view of ``nbytes`` at ``address`` inside the arena (shares the arena's storage)."""
        start = address - self.address
        return self.tensor[start:start + nbytes]


def external_bytes(address: int, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over memory the engine provides outside the arena (the mmap backend's view of the file).

    Zero-copy: the tensor aliases the mapping, which stays valid while the engine is open.
    """
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    buffer = (ctypes.c_uint8 * nbytes).from_address(address)
    return torch.frombuffer(buffer, dtype=torch.uint8)


def slot_sizes(infos: List[dict]) -> List[int]:
    return [slot_bytes(info["slot_size"]) for info in infos]
