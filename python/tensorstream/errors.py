"""TensorStream's exceptions.

Every error the engine raises is a ``TensorStreamError`` and also subclasses the builtin a Python user would
catch for that kind of problem:

=====================  ==========================  ==================================================
class                  also a                      raised when
=====================  ==========================  ==================================================
``IoError``            ``OSError`` (errno, path)   a system call failed: missing file, full disk, ...
                                                   (ENOENT / EACCES / ENOTDIR also subclass
                                                   FileNotFoundError / PermissionError / NotADirectoryError)
``FormatError``        ``ValueError``              a store file breaks a rule of docs/format.md
``CorruptionError``    ``OSError``                 stored bytes fail their checksum or do not decode
``ConfigError``        ``ValueError``              a setting or argument is out of range
``CudaError``          ``RuntimeError``            a CUDA call failed
=====================  ==========================  ==================================================

The C++ engine raises these through ``tensorstream._core``; the attributes name the cause.
"""

from __future__ import annotations

import errno as _errno


class TensorStreamError(Exception):
    """Base class of every TensorStream error."""


class IoError(TensorStreamError, OSError):
    """A system call failed. ``errno`` and ``filename`` are set as for ``OSError``."""

    def __init__(self, errno: int, message: str, path: str = "") -> None:
        OSError.__init__(self, errno, message, path)
        self.path = path

    def __str__(self) -> str:  # the engine's message already names the path and the errno
        return str(self.strerror)


class StoreNotFoundError(IoError, FileNotFoundError):
    """ENOENT: a storage directory, model or file does not exist."""


class StorePermissionError(IoError, PermissionError):
    """EACCES / EPERM: the process may not read or write the path."""


class StoreNotADirectoryError(IoError, NotADirectoryError):
    """ENOTDIR: a path component that must be a directory is a file."""


_IO_ERROR_FOR_ERRNO = {
    _errno.ENOENT: StoreNotFoundError,
    _errno.EACCES: StorePermissionError,
    _errno.EPERM: StorePermissionError,
    _errno.ENOTDIR: StoreNotADirectoryError,
}


def make_io_error(errno: int, message: str, path: str = "") -> IoError:
    """The IoError for ``errno``, also an instance of the matching builtin (``FileNotFoundError`` for ENOENT, ...),
    as ``OSError(errno, ...)`` itself would be."""
    return _IO_ERROR_FOR_ERRNO.get(errno, IoError)(errno, message, path)


class FormatError(TensorStreamError, ValueError):
    """A store file breaks format rule ``rule`` (an identifier from docs/format.md)."""

    def __init__(self, message: str, rule: str = "", path: str = "") -> None:
        super().__init__(message)
        self.rule = rule
        self.path = path


class CorruptionError(TensorStreamError, OSError):
    """Stored bytes of ``tensor`` (chunk ``chunk`` at ``offset`` of ``path``) in ``model`` are corrupt."""

    def __init__(self, message: str, path: str = "", model: str = "", tensor: str = "", chunk: int = 0,
                 offset: int = 0) -> None:
        super().__init__(message)
        self.path = path
        self.model = model
        self.tensor = tensor
        self.chunk = chunk
        self.offset = offset

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(TensorStreamError, ValueError):
    """A setting or argument is invalid; ``field`` names it."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class CudaError(TensorStreamError, RuntimeError):
    """A CUDA call failed; ``code`` is the CUDA error code."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


__all__ = ["TensorStreamError", "IoError", "StoreNotFoundError", "StorePermissionError", "StoreNotADirectoryError",
           "make_io_error", "FormatError", "CorruptionError", "ConfigError", "CudaError"]
