"""TensorStream: run PyTorch models bigger than GPU memory or RAM by streaming verified weights from fast storage.

This package is a thin layer over the C++ engine in ``tensorstream._core``. ``torch`` is imported only by the
functions that need it, so ``import tensorstream`` works without it.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (ConfigError, CorruptionError, CudaError, FormatError, IoError,  # noqa: F401
                     TensorStreamError)
from .maintenance import (BadChunk, CleanupReport, DefragReport, ModelDefrag, ModelVerification,  # noqa: F401
                          VerifyReport, cleanup_orphaned_files, defragment_storage, read_execution_order,
                          record_execution_order, verify_storage_integrity)
from .store import ModelStore, SaveResult, Storage, fingerprint, open_model, write_model  # noqa: F401
from .config import BackendType, Config, PrefetchStrategy, create_default_config  # noqa: F401
from .cuda import CudaStatus, cuda_available  # noqa: F401
from .torch import (from_pretrained, get_model_statistics, offload, optimize_memory_usage,  # noqa: F401
                    write_trace)

__all__ = [
    "__version__",
    # errors
    "TensorStreamError", "IoError", "FormatError", "CorruptionError", "ConfigError", "CudaError",
    # store
    "write_model", "open_model", "fingerprint", "SaveResult", "Storage", "ModelStore",
    # maintenance
    "verify_storage_integrity", "cleanup_orphaned_files", "defragment_storage", "record_execution_order",
    "read_execution_order", "VerifyReport", "ModelVerification", "BadChunk", "CleanupReport", "DefragReport",
    "ModelDefrag",
    # configuration and PyTorch offloading
    "Config", "BackendType", "PrefetchStrategy", "create_default_config", "from_pretrained", "offload",
    "get_model_statistics",
    "optimize_memory_usage", "write_trace",
    # the GPU path
    "cuda_available", "CudaStatus",
]
