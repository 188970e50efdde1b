"""Forward hooks that stream a block in before its modules run and bind the parameters to the block's slot.

Life of a block (DESIGN.md §7):

* **pre-hook** (``register_forward_pre_hook(..., with_kwargs=True, prepend=True)`` on every hooked module of the
  block): ``engine.acquire`` pins the block and ``ticket.wait`` waits for its bytes (both release the GIL); then,
  under the runtime lock, each parameter's ``.data`` becomes a zero-copy view of the slot (only when the block now
  lives at another address than the one its parameters point to), and the Python-side pin count goes up.
* **post-hook** (``register_forward_hook(..., always_call=True)``, so it also runs when the forward raises): the pin
  count goes down and ``engine.release`` unpins. The views stay: another thread may still be computing with them.
* **eviction** (``engine.set_eviction_callback``): when the engine gives the block's slot to another block, the
  parameters get their placeholders back, under the lock and only if no pin is held (a callback that races with a
  fresh acquire of the same block must not clobber the new views).

Nesting: a thread that already holds a block (the layer's pre-hook ran, now one of its linears runs) does not call
the engine again; a per-thread count tracks it, so the engine sees one access per use of the block (which keeps
hit rates and the learned execution order meaningful). Different threads pin independently.

Placeholders have the parameter's dtype and shape but no memory: a 0-dim tensor expanded (stride 0). Floating
placeholders hold NaN, so a parameter used outside its module's forward shows up as NaN rather than as plausible
numbers.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError
from .arena import external_bytes
from .device import Placement
from .partition import Block

logger = logging.getLogger("tensorstream")

__all__ = ["StreamBlock", "StreamingRuntime", "placeholder"]

_PLACEHOLDER_BASES: Dict[Tuple[torch.dtype, torch.device], torch.Tensor] = {}
_PLACEHOLDER_LOCK = threading.Lock()


def placeholder(dtype: torch.dtype, shape: Tuple[int, ...], device: Optional[torch.device] = None) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` on ``device`` (default: the CPU) that takes no memory: one shared element,
    expanded (NaN when the dtype has NaN, else zero). Writes to it raise (several elements alias one location)."""
    device = torch.device("cpu") if device is None else device
    with _PLACEHOLDER_LOCK:
        base = _PLACEHOLDER_BASES.get((dtype, device))
        if base is None:
            with torch.inference_mode(False):
                base = torch.zeros((), dtype=dtype)
                if dtype.is_floating_point or dtype.is_complex:
                    try:
                        base = torch.tensor(float("nan")).to(dtype)
                    except (RuntimeError, TypeError):  # pragma: no cover - a dtype without a NaN conversion
                        pass
                base = base.to(device)  # one element: moving it costs nothing, expanding it never copies
            _PLACEHOLDER_BASES[(dtype, device)] = base
    with torch.inference_mode(False):
        return base.expand(shape)


class StreamBlock:
    """Runtime state of one streamed block."""

    __slots__ = ("block", "index", "name", "slot_size", "tensors", "placeholders", "pins", "bound_address")

    def __init__(self, block: Block, index: int, slot_size: int,
                 tensors: List[Tuple[nn.Parameter, int, int, torch.dtype, Tuple[int, ...]]],
                 device: Optional[torch.device] = None) -> None:
        self.block = block
        self.index = index              # block index in the store (what the engine calls it)
        self.name = block.name
        self.slot_size = slot_size
        self.tensors = tensors          # (param, slot_offset, nbytes, dtype, shape)
        self.placeholders = [placeholder(dtype, shape, device) for _p, _o, _n, dtype, shape in tensors]
        self.pins = 0                   # Python-side pins (threads inside a hooked module), under the runtime lock
        self.bound_address: Optional[int] = None  # slot address the parameters view, None: placeholders


def nesting_hooks(key: int, tls: Any, enter: Callable[[], bool],
                  leave: Callable[[], None]) -> Tuple[Callable[..., None], Callable[..., None]]:
    """A forward pre-hook and post-hook for the modules of one block (``key``) that call ``enter()`` when a thread
    first enters any of them and ``leave()`` when it leaves the outermost one: a block whose modules nest, or a
    module called again inside its own forward, is entered once. ``tls`` is per-thread state with ``held`` (key ->
    depth) and ``frames`` (one entry per hooked call on the stack). ``enter`` returns False to do nothing for this
    call (the post-hook then does nothing either); if it raises, so does the pre-hook, and the post-hook (which
    torch still runs) does nothing."""

    def pre_hook(module: nn.Module, args: Any, kwargs: Any) -> None:
        frames = tls.frames
        depth = tls.held.get(key, 0)
        if depth > 0:
            tls.held[key] = depth + 1
            frames.append((id(module), key))
            return None
        try:
            entered = enter()
        except BaseException:
            frames.append((id(module), None))
            raise
        if not entered:
            frames.append((id(module), None))
            return None
        tls.held[key] = 1
        frames.append((id(module), key))
        return None

    def post_hook(module: nn.Module, args: Any, output: Any) -> None:
        frames = tls.frames
        if not frames or frames[-1][0] != id(module):
            return None  # our pre-hook did not run for this call (an earlier pre-hook raised)
        _mid, held_key = frames.pop()
        if held_key is None:
            return None
        depth = tls.held.get(held_key, 0) - 1
        if depth > 0:
            tls.held[held_key] = depth
            return None
        tls.held.pop(held_key, None)
        leave()
        return None

    return pre_hook, post_hook


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.held: Dict[int, int] = {}        # block index -> nesting depth in this thread
        self.frames: List[Tuple[int, Optional[int]]] = []  # (id(module), block index, None: nothing entered)
        self.started: Dict[int, float] = {}   # block index -> time the block became usable (debug timings)
        self.computing: Dict[int, int] = {}   # block index -> time.monotonic_ns() it became usable (tracing)


class StreamingRuntime:
    """Hooks, bindings and eviction handling for the streamed blocks of one model."""

    def __init__(self, engine: Any, arena: Any, blocks: List[StreamBlock], debug: bool = False,
                 placement: Optional[Placement] = None) -> None:
        self.engine = engine
        self.arena = arena
        # Where slots live and how a hook orders compute after the engine's copies (device.py).
        self.placement = placement if placement is not None else Placement("cpu", torch.device("cpu"))
        self.blocks = blocks
        self.by_index: Dict[int, StreamBlock] = {b.index: b for b in blocks}
        self.debug = debug
        # A tensorstream.trace.TraceCollector when Config.trace_path is set: gets one compute span per use of a
        # block. Set once by offload() before the hooks run.
        self.tracer: Optional[Any] = None
        self.lock = threading.Lock()
        self.handles: List[Any] = []
        self._tls = _ThreadState()
        self.closed = False

    # -- installation ------------------------------------------------------------------------------------------

    def install(self) -> None:
        """Registers the hooks and the eviction callback, then replaces the parameters by placeholders."""
        try:
            for sb in self.blocks:
                for module, path in zip(sb.block.modules, sb.block.module_names):
                    pre, post = self._make_hooks(sb, path)
                    self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
                    self.handles.append(module.register_forward_hook(post, always_call=True))
            self.engine.set_eviction_callback(_eviction_callback(weakref.ref(self)))
        except BaseException:
            self.remove_hooks()
            raise
        with self.lock:
            for sb in self.blocks:
                self._unbind_locked(sb)

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    # -- hooks -------------------------------------------------------------------------------------------------

    def _make_hooks(self, sb: StreamBlock, path: str) -> Tuple[Callable[..., None], Callable[..., None]]:
        runtime_ref = weakref.ref(self)

        def enter() -> bool:
            runtime = runtime_ref()
            if runtime is None:
                return False
            runtime._acquire(sb, path)
            return True

        def leave() -> None:
            runtime = runtime_ref()
            if runtime is not None:
                runtime._release(sb)

        return nesting_hooks(sb.index, self._tls, enter, leave)

    def _acquire(self, sb: StreamBlock, path: str) -> None:
        if self.closed:
            raise ConfigError(f"module '{path}' runs after its TensorStream engine was closed", field="engine")
        started = time.perf_counter()
        ticket = self.engine.acquire(sb.index)
        try:
            self.placement.wait(ticket)  # host: until loaded; device: the current stream waits for the copies
            self._bind(sb, ticket.address, ticket.nbytes)
        except BaseException as error:
            self.engine.release(sb.index)
            if hasattr(error, "add_note"):
                error.add_note(f"(TensorStream: loading block '{sb.name}' for module '{path}')")
            raise
        if self.tracer is not None:
            # Compute starts once the weights are bound: a wait for them is the engine's stall, just before.
            self._tls.computing[sb.index] = time.monotonic_ns()
        if self.debug:
            now = time.perf_counter()
            self._tls.started[sb.index] = now
            logger.debug("block '%s' (module '%s'): acquired in %.3f ms", sb.name, path, (now - started) * 1e3)

    def _release(self, sb: StreamBlock) -> None:
        tracer = self.tracer
        if tracer is not None:
            started = self._tls.computing.pop(sb.index, None)
            if started is not None:
                tracer.compute(sb.index, started, time.monotonic_ns())
        with self.lock:
            sb.pins -= 1
        if self.debug:
            started = self._tls.started.pop(sb.index, None)
            if started is not None:
                logger.debug("block '%s': computed for %.3f ms", sb.name, (time.perf_counter() - started) * 1e3)
        if not self.closed:
            # Device slots: the fence on the current stream, after the kernels this module queued.
            self.engine.release(sb.index, self.placement.current_stream())

    # -- binding -----------------------------------------------------------------------------------------------

    def _slot_bytes(self, address: int, nbytes: int) -> torch.Tensor:
        if self.arena.contains(address, nbytes):
            return self.arena.bytes_at(address, nbytes)
        return external_bytes(address, nbytes)  # the mmap backend's zero-copy view of the file

    def _bind(self, sb: StreamBlock, address: int, nbytes: int) -> None:
        with self.lock:
            device = self.placement.torch_device
            for param, _offset, _n, dtype, shape in sb.tensors:
                if param.dtype != dtype or param.device.type != device.type or tuple(param.shape) != shape:
                    raise ConfigError(
                        f"parameter of block '{sb.name}' is {param.dtype} {tuple(param.shape)} on {param.device}, but "
                        f"TensorStream streams it as {dtype} {shape} on {device}: the model was converted after "
                        "offload() (move it with model.to(device); for a dtype, call cleanup_tensorstream() first, "
                        "convert, then offload again)", field="model")
            if sb.bound_address != address:
                with torch.inference_mode(False):
                    slot = self._slot_bytes(address, nbytes)
                    for param, offset, n, dtype, shape in sb.tensors:
                        if n == 0:
                            view = torch.empty(shape, dtype=dtype, device=device)
                        else:
                            view = slot[offset:offset + n].view(dtype).view(shape)
                        param.data = view
                sb.bound_address = address
            sb.pins += 1

    def _unbind_locked(self, sb: StreamBlock) -> None:
        with torch.inference_mode(False):
            for (param, _o, _n, _d, _s), ph in zip(sb.tensors, sb.placeholders):
                param.data = ph
        sb.bound_address = None

    def on_evicted(self, index: int) -> None:
        sb = self.by_index.get(index)
        if sb is None:
            return
        with self.lock:
            if sb.pins == 0 and sb.bound_address is not None:
                self._unbind_locked(sb)
        if self.debug:
            logger.debug("block '%s' evicted", sb.name)

    def pinned_blocks(self) -> int:
        with self.lock:
            return sum(1 for sb in self.blocks if sb.pins > 0)


def _eviction_callback(runtime_ref: "weakref.ReferenceType[StreamingRuntime]") -> Callable[[int], None]:
    """The engine's eviction callback. It runs on engine threads: it must never raise (nothing may throw there)."""

    def on_evict(index: int) -> None:
        try:
            runtime = runtime_ref()
            if runtime is not None:
                runtime.on_evicted(index)
        except BaseException:  # noqa: BLE001 - logged, never propagated into the engine
            try:
                logger.exception("TensorStream eviction callback failed for block %d", index)
            except BaseException:  # noqa: BLE001
                pass

    return on_evict
