"""What this machine offers the GPU path: ``tensorstream.cuda_available()``.

The engine loads the CUDA driver (``libcuda.so.1``) and cuFile (``libcufile.so.0``) at run time with ``dlopen``;
nothing in the package links against CUDA, so it imports and runs its CPU path anywhere. cuFile is looked for on the
loader's path and then inside the ``nvidia-cufile`` wheel (``nvidia/cufile/lib``), where pip installs it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import List

from . import _core


@dataclasses.dataclass(frozen=True)
class CudaStatus:
    """Truthy when the driver loaded, ``cuInit`` succeeded and at least one device is visible."""

    available: bool
    reason: str            # why not ("" when available)
    driver_version: int    # e.g. 12080 for CUDA 12.8
    device_count: int
    cufile: bool           # libcufile loaded with every entry point GPUDIRECT uses
    cufile_reason: str
    cufile_path: str

    def __bool__(self) -> bool:
        return self.available


def _cufile_wheel_candidates() -> List[str]:
    """``libcufile.so.0`` inside the nvidia-cufile wheel, if that wheel is installed (found without importing it)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [os.path.join(root, "cufile", "lib", "libcufile.so.0") for root in spec.submodule_search_locations]


def cuda_available() -> CudaStatus:
    """Loads CUDA once per process and says what was found; never raises (the reason says what is missing)."""
    return CudaStatus(**_core.cuda_available(_cufile_wheel_candidates()))


__all__ = ["CudaStatus", "cuda_available"]
