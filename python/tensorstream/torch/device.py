"""Where an offloaded model computes: its ``Placement``.

- ``cpu``: host slots. The arena is host memory; a hook waits for its block on the host (``Ticket.wait``).
- ``cuda:N``: device slots. The arena is allocated through torch on that device (so ``torch.cuda.memory_allocated``
  counts it) and the resident set lives there too. A hook makes the current stream wait for its block's ready event
  (``Ticket.wait_on_stream``: no host synchronisation) and, when the module is done, hands the engine a fence on
  the same stream (``Engine.release(block, stream)``), so a slot is refilled only after the kernels that read it.
  Streams are torch's: ``torch.cuda.current_stream(device).cuda_stream``.
- Tests without a GPU: inside ``use_cuda_double(double)`` (a ``_core.CudaDouble``), ``cuda:N`` runs the engine's
  real CUDA path on the CPU double of the driver. Tensors stay on torch's CPU (the double's device memory is host
  memory); the compute stream is a stream of the double. Since a CPU op runs as soon as Python calls it, the hook
  synchronizes that stream right after making it wait, which is what a GPU would do in stream order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from typing import Any, Iterator, Optional

import torch

from ..errors import ConfigError
from .arena import Arena

logger = logging.getLogger("tensorstream")

__all__ = ["Placement", "resolve_placement", "use_cuda_double"]

_DOUBLE_LOCK = threading.Lock()
_DOUBLE: Optional[Any] = None  # the active _core.CudaDouble, if any


@contextlib.contextmanager
def use_cuda_double(double: Any) -> Iterator[Any]:
    """Within the block, ``cuda:N`` placements run on ``double`` (a ``_core.CudaDouble``) instead of a GPU."""
    global _DOUBLE
    with _DOUBLE_LOCK:
        previous, _DOUBLE = _DOUBLE, double
    try:
        yield double
    finally:
        with _DOUBLE_LOCK:
            _DOUBLE = previous


@dataclasses.dataclass
class Placement:
    """Where slots and resident tensors live, and how hooks order compute after the engine's copies."""

    name: str                      # "cpu" or "cuda:N"
    torch_device: torch.device     # where torch allocates this placement's tensors
    ordinal: int = 0               # the CUDA device ordinal
    device_slots: bool = False
    double: Optional[Any] = None   # the _core.CudaDouble it runs on, when emulated
    stream: int = 0                # emulated: the compute stream (a double stream), made by open()

    def open(self) -> None:
        """Creates what the placement needs once bound (the double's compute stream)."""
        if self.double is not None and self.stream == 0:
            self.stream = self.double.create_stream(self.ordinal)

    def close(self) -> None:
        if self.double is not None and self.stream != 0:
            self.double.destroy_stream(self.stream)
            self.stream = 0

    def arena(self, nbytes: int) -> Arena:
        return Arena(nbytes, self.torch_device)  # the double's "device" memory is host memory: torch_device is cpu

    def engine_options(self) -> dict:
        """Keyword arguments of ``_core.Engine`` for this placement."""
        if not self.device_slots:
            return {}
        return {"device": self.ordinal, "cuda_double": self.double}

    def current_stream(self) -> Optional[int]:
        """The native handle of the stream kernels run on now (None for host slots). 0 is a real stream: CUDA's
        legacy default stream, which is what torch's default stream is."""
        if not self.device_slots:
            return None
        if self.double is not None:
            return self.stream
        return torch.cuda.current_stream(self.torch_device).cuda_stream

    def wait(self, ticket: Any) -> None:
        """Orders what runs next after the block's bytes are in its slot."""
        if not self.device_slots:
            ticket.wait()
            return
        stream = self.current_stream()
        ticket.wait_on_stream(stream)
        if self.double is not None:
            self.double.synchronize_stream(stream)  # the CPU op about to run would otherwise not wait

    def describe(self) -> str:
        return f"{self.name} (emulated on the CUDA double)" if self.double is not None else self.name


def resolve_placement(device: Any) -> Placement:
    """``device`` (None, "cpu", "cuda", "cuda:N", a torch.device or an int ordinal) as a Placement; ConfigError
    naming the device and the reason when it cannot be used."""
    if device is None:
        return Placement("cpu", torch.device("cpu"))
    try:
        parsed = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"invalid device: {device!r} is not a torch device ({error})", field="device") from None
    if parsed.type == "cpu":
        return Placement("cpu", torch.device("cpu"))
    if parsed.type != "cuda":
        raise ConfigError(f"invalid device: {parsed} is not supported (TensorStream streams to 'cpu' or 'cuda:N')",
                          field="device")
    ordinal = 0 if parsed.index is None else parsed.index
    name = f"cuda:{ordinal}"
    with _DOUBLE_LOCK:
        double = _DOUBLE
    if double is not None:
        return Placement(name, torch.device("cpu"), ordinal, True, double)
    from ..cuda import cuda_available
    status = cuda_available()
    if not status.available:
        raise ConfigError(f"invalid device: {name} needs a CUDA device and driver: {status.reason}", field="device")
    if not torch.cuda.is_available():
        raise ConfigError(f"invalid device: {name}: this PyTorch ({torch.__version__}) has no CUDA support",
                          field="device")
    if ordinal >= torch.cuda.device_count():
        raise ConfigError(f"invalid device: {name}: torch sees {torch.cuda.device_count()} CUDA device(s)",
                          field="device")
    return Placement(name, torch.device("cuda", ordinal), ordinal, True)
