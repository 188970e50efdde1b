"""TensorStream: run PyTorch models bigger than GPU memory or RAM by streaming verified weights from fast storage.

This package is a thin layer over the C++ engine in ``tensorstream._core``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (ConfigError, CorruptionError, CudaError, FormatError, IoError,  # noqa: F401
                     TensorStreamError)
