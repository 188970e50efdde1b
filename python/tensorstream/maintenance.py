"""Storage maintenance: the deployment guide's ``verify_storage_integrity``, ``cleanup_orphaned_files`` and
``defragment_storage``, plus ``record_execution_order`` (the hint defragmentation follows).

The work is done by the C++ engine; these functions wrap its plain-dict results in report dataclasses with a
readable ``str()`` and a ``to_dict()`` for JSON. ``storage_path=None`` means the ``TENSORSTREAM_STORAGE_PATH``
environment variable.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Union

from . import _core
from .errors import ConfigError

PathLike = Union[str, "os.PathLike[str]"]

STORAGE_PATH_ENV = "TENSORSTREAM_STORAGE_PATH"

__all__ = [
    "BadChunk", "ModelVerification", "VerifyReport", "CleanupReport", "ModelDefrag", "DefragReport",
    "verify_storage_integrity", "cleanup_orphaned_files", "defragment_storage", "record_execution_order",
    "read_execution_order", "STORAGE_PATH_ENV",
]


def resolve_storage_path(storage_path: Optional[PathLike] = None) -> str:
    """``storage_path`` as a string, or the value of TENSORSTREAM_STORAGE_PATH when it is None."""
    if storage_path is None:
        value = os.environ.get(STORAGE_PATH_ENV, "")
        if not value:
            raise ConfigError(f"no storage path given and {STORAGE_PATH_ENV} is not set", field=STORAGE_PATH_ENV)
        return value
    path = os.fspath(storage_path)
    return path if isinstance(path, str) else os.fsdecode(path)


def _model_arg(model: Optional[str]) -> Optional[str]:
    if model is not None and not isinstance(model, str):
        raise ConfigError(f"model must be a model id (str) or None, got {type(model).__name__}", field="model")
    return model


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{nbytes} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{nbytes} B"  # pragma: no cover


class _Report:
    def to_dict(self) -> Dict[str, Any]:
        """A plain dict (JSON-serialisable) with the same structure as the report."""
        return dataclasses.asdict(self)


# ---- verify ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadChunk(_Report):
    """One chunk that failed its checksum or did not decode: model, tensor, chunk index, file offset, error."""

    model: str
    tensor: str
    chunk: int
    offset: int
    error: str

    @property
    def detail(self) -> str:
        """The cause without the location prefix the engine's message repeats (e.g. 'checksum mismatch (...)')."""
        prefix = "corrupt data in model "
        if self.error.startswith(prefix) and "': " in self.error:
            return self.error.split("': ", 1)[1]
        return self.error

    def __str__(self) -> str:
        return (f"model '{self.model}', tensor '{self.tensor}', chunk {self.chunk} at offset {self.offset}: "
                f"{self.detail}")


@dataclass(frozen=True)
class ModelVerification(_Report):
    """The result of verifying one model. ``error`` is a model-level problem ('' when none)."""

    model: str
    ok: bool
    tensors: int
    chunks_checked: int
    bytes_checked: int
    error: str
    bad_chunks: List[BadChunk] = field(default_factory=list)

    def __str__(self) -> str:
        if self.ok:
            head = (f"model '{self.model}': ok ({self.tensors} tensors, {self.chunks_checked} chunks, "
                    f"{_size(self.bytes_checked)} checked)")
        else:
            head = f"model '{self.model}': FAILED: {self.error or 'corrupt'}"
        return "\n".join([head] + [f"  bad chunk: {b}" for b in self.bad_chunks])


@dataclass(frozen=True)
class VerifyReport(_Report):
    """The result of :func:`verify_storage_integrity`.

    ``ok`` is True when every model verified; ``orphans`` lists what ``cleanup_orphaned_files`` would remove
    (debris, not an error).
    """

    ok: bool
    models: List[ModelVerification] = field(default_factory=list)
    orphans: List[str] = field(default_factory=list)
    storage_path: str = ""

    @property
    def bad_chunks(self) -> List[BadChunk]:
        """Every bad chunk of every model."""
        return [chunk for model in self.models for chunk in model.bad_chunks]

    @property
    def failed_models(self) -> List[str]:
        return [m.model for m in self.models if not m.ok]

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        where = f" {self.storage_path}" if self.storage_path else ""
        if self.ok:
            head = f"storage{where}: OK ({len(self.models)} model(s) verified)"
        else:
            head = (f"storage{where}: FAILED ({len(self.failed_models)} of {len(self.models)} model(s) bad, "
                    f"{len(self.bad_chunks)} bad chunk(s))")
        lines = [head] + [f"  {line}" for model in self.models for line in str(model).splitlines()]
        if self.orphans:
            lines.append(f"  {len(self.orphans)} orphan(s) (cleanup_orphaned_files would remove them):")
            lines += [f"    {path}" for path in self.orphans]
        return "\n".join(lines)

    @classmethod
    def _from_core(cls, raw: Dict[str, Any], storage_path: str) -> "VerifyReport":
        models = [
            ModelVerification(model=m["model"], ok=bool(m["ok"]), tensors=m["tensors"],
                              chunks_checked=m["chunks_checked"], bytes_checked=m["bytes_checked"], error=m["error"],
                              bad_chunks=[BadChunk(**b) for b in m["bad_chunks"]])
            for m in raw["models"]
        ]
        return cls(ok=bool(raw["ok"]), models=models, orphans=list(raw["orphans"]), storage_path=storage_path)


def verify_storage_integrity(storage_path: Optional[PathLike] = None, model: Optional[str] = None) -> VerifyReport:
    """Checks every model (or only ``model``) completely: every format rule, every chunk's checksum and decoding,
    padding, and the content fingerprint. Problems inside the store are reported, not raised; a storage directory
    that cannot be opened raises IoError / FormatError, an invalid ``model`` id ConfigError.
    """
    root = resolve_storage_path(storage_path)
    return VerifyReport._from_core(_core.verify_storage(root, _model_arg(model)), root)


# ---- cleanup -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CleanupReport(_Report):
    """The result of :func:`cleanup_orphaned_files`: what was (or, with ``dry_run``, would be) removed."""

    removed: List[str] = field(default_factory=list)
    kept_in_use: List[str] = field(default_factory=list)
    bytes_freed: int = 0
    dry_run: bool = False
    storage_path: str = ""

    def __str__(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        where = f"storage {self.storage_path}: " if self.storage_path else ""
        lines = [f"{where}{verb} {len(self.removed)} orphan(s), {_size(self.bytes_freed)}"
                 + (" (dry run)" if self.dry_run else "")]
        lines += [f"  {verb}: {path}" for path in self.removed]
        lines += [f"  kept (writer still running): {path}" for path in self.kept_in_use]
        return "\n".join(lines)


def cleanup_orphaned_files(storage_path: Optional[PathLike] = None, dry_run: bool = False) -> CleanupReport:
    """Removes leftovers: temp directories of writers that are no longer running, files in model directories that
    no manifest references, and model directories without a manifest. Published models are never touched, nor
    temp directories whose writer is alive. ``dry_run=True`` only reports.
    """
    root = resolve_storage_path(storage_path)
    raw = _core.cleanup_orphans(root, bool(dry_run))
    return CleanupReport(removed=list(raw["removed"]), kept_in_use=list(raw["kept_in_use"]),
                         bytes_freed=raw["bytes_freed"], dry_run=bool(raw["dry_run"]), storage_path=root)


# ---- defragment --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDefrag(_Report):
    """What defragmentation did to one model, and why."""

    model: str
    rewritten: bool
    reason: str
    bytes_before: int
    bytes_after: int

    @property
    def failed(self) -> bool:
        """True when the model could not be rewritten because of an error (unreadable or corrupt data)."""
        return self.reason.startswith("not rewritten:")

    def __str__(self) -> str:
        state = "rewritten" if self.rewritten else ("FAILED" if self.failed else "unchanged")
        sizes = f"{_size(self.bytes_before)} -> {_size(self.bytes_after)}" if self.rewritten else _size(
            self.bytes_before)
        return f"model '{self.model}': {state} ({sizes}): {self.reason}"


@dataclass(frozen=True)
class DefragReport(_Report):
    """The result of :func:`defragment_storage`, one entry per model visited."""

    models: List[ModelDefrag] = field(default_factory=list)
    storage_path: str = ""

    @property
    def rewritten(self) -> List[str]:
        return [m.model for m in self.models if m.rewritten]

    @property
    def failed(self) -> List[str]:
        return [m.model for m in self.models if m.failed]

    def __str__(self) -> str:
        where = f"storage {self.storage_path}: " if self.storage_path else ""
        lines = [f"{where}{len(self.rewritten)} of {len(self.models)} model(s) rewritten"]
        lines += [f"  {m}" for m in self.models]
        return "\n".join(lines)


def defragment_storage(storage_path: Optional[PathLike] = None, model: Optional[str] = None) -> DefragReport:
    """Rewrites each model (or only ``model``) with its blocks in the recorded execution order (see
    :func:`record_execution_order`), so a forward pass reads the data file front to back. Every chunk is verified
    on the way; a model without a recorded order, or already in it, is left alone. Atomic per model.
    """
    root = resolve_storage_path(storage_path)
    raw = _core.defragment(root, _model_arg(model))
    models = [ModelDefrag(model=m["model"], rewritten=bool(m["rewritten"]), reason=m["reason"],
                          bytes_before=m["bytes_before"], bytes_after=m["bytes_after"]) for m in raw["models"]]
    return DefragReport(models=models, storage_path=root)


# ---- execution order ---------------------------------------------------------------------------------------------


def record_execution_order(storage_path: Optional[PathLike], model: str, block_names: Iterable[str]) -> None:
    """Records the order in which ``model``'s blocks execute (a hint for :func:`defragment_storage`).

    Every name must be a block of the model, at most once (ConfigError otherwise); blocks not named keep their
    relative order after the named ones.
    """
    root = resolve_storage_path(storage_path)
    if isinstance(block_names, str):
        raise ConfigError("block_names must be an iterable of block names, not one string", field="block_names")
    names = list(block_names)
    from .store import open_model  # late: store imports nothing from here, but keep the modules independent

    with open_model(root, model) as stored:
        known = set(stored.block_names())
    seen = set()
    for name in names:
        if not isinstance(name, str) or name not in known:
            raise ConfigError(f"model '{model}' has no block {name!r}", field="block_names")
        if name in seen:
            raise ConfigError(f"block {name!r} appears twice in the execution order", field="block_names")
        seen.add(name)
    _core.write_execution_order(root, model, names)


def read_execution_order(storage_path: Optional[PathLike], model: str) -> Optional[List[str]]:
    """The recorded execution order of ``model``, or None when there is none (or it is malformed)."""
    root = resolve_storage_path(storage_path)
    if not isinstance(model, str) or not _core.is_valid_model_id(model):
        raise ConfigError(f"{model!r} is not a valid model id", field="model")
    order = _core.read_execution_order(root, model)
    return None if order is None else list(order)
