"""Writing and reading models in a TensorStream storage directory.

A storage directory (docs/format.md) holds many models; each model is a list of named *blocks* (the unit the
engine streams, usually one layer), each a list of named tensors::

    import tensorstream as ts

    result = ts.write_model("/nvme/ts", {"layer0": {"w": w0, "b": b0}, "layer1": {"w": w1}})
    with ts.open_model("/nvme/ts", result.model_id) as model:
        w0_again = model.read("w")

A model bigger than memory is written one block at a time: pass an iterable of ``(block name, tensors)`` pairs, for
instance a generator that loads each block just before it is written (a named ``model_id`` is then required)::

    def blocks():
        for i in range(80):
            yield f"layer{i}", load_layer(i)      # only this block is in memory while it is written

    ts.write_model("/nvme/ts", blocks(), model_id="big")

All byte work (checksums, compression, file I/O, fsync, atomic publish) happens in the C++ engine
(``tensorstream._core``); this module turns torch tensors into (address, size) pairs and back. ``torch`` is
imported only inside the functions that need it, so ``import tensorstream`` works without it.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import pathlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

from . import _core
from .errors import ConfigError, IoError
from .progress import WriteProgress, progress_enabled

if TYPE_CHECKING:  # pragma: no cover
    import torch

PathLike = Union[str, "os.PathLike[str]"]
# Tensors of one block: a mapping name -> tensor, or an iterable of (name, tensor) pairs (read one at a time).
BlockTensors = Union[Mapping[str, "torch.Tensor"], Iterable[Tuple[str, "torch.Tensor"]]]
# A model: a mapping block name -> tensors, or an iterable of (block name, tensors) pairs (a generator streams the
# model block by block: each block is produced when the writer reaches it and dropped once it is written).
Blocks = Union[Mapping[str, BlockTensors], Iterable[Tuple[str, BlockTensors]]]

__all__ = ["SaveResult", "Storage", "ModelStore", "write_model", "open_model", "fingerprint"]


@dataclass(frozen=True)
class SaveResult:
    """What :func:`write_model` did.

    ``outcome`` is ``"published"`` (a new model), ``"replaced"`` (an existing model of that id was atomically
    replaced) or ``"already_existed"`` (nothing was written: the model was already there). For
    ``already_existed`` the other fields describe the model that is stored.
    """

    model_id: str
    fingerprint: str
    outcome: str
    raw_bytes: int
    stored_bytes: int

    @property
    def written(self) -> bool:
        """True when this call wrote the model (published or replaced it)."""
        return self.outcome != "already_existed"


# ---- tensors <-> (address, size) --------------------------------------------------------------------------------


def _dtype_name(tensor: "torch.Tensor") -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _torch_dtype(name: str) -> "torch.dtype":
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):  # pragma: no cover - the manifest parser only admits torch's names
        raise ConfigError(f"dtype '{name}' has no torch equivalent in torch {torch.__version__}", field="dtype")
    return dtype


def _as_host_tensor(tensor: Any, block: str, name: str) -> "torch.Tensor":
    """A dense, contiguous CPU tensor with the same logical bytes as ``tensor`` (no copy when already so)."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"block '{block}', tensor '{name}': expected a torch.Tensor, got {type(tensor).__name__}",
                          field="blocks")
    if tensor.layout != torch.strided:
        raise ConfigError(f"block '{block}', tensor '{name}': layout {tensor.layout} is not supported "
                          "(only dense tensors; call .to_dense() first)", field="blocks")
    if tensor.device.type == "meta":
        raise ConfigError(f"block '{block}', tensor '{name}': a meta tensor has no data to store", field="blocks")
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    # A conjugate or negative view shares its storage with the original: materialise the logical values.
    tensor = tensor.resolve_conj().resolve_neg()
    return tensor.contiguous()


_BLOCKS_SHAPE = ("a mapping of block name -> {tensor name -> tensor}, or an iterable of (block name, tensors) "
                 "pairs")


def _is_streamed(blocks: Any) -> bool:
    """True for the one-pass form (an iterable of pairs), False for a mapping."""
    if isinstance(blocks, Mapping):
        return False
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Iterable):
        raise ConfigError(f"blocks must be {_BLOCKS_SHAPE}, got {type(blocks).__name__}", field="blocks")
    return True


def _pairs(items: Any, what: str) -> Iterator[Tuple[Any, Any]]:
    """(key, value) pairs of a mapping, or of an iterable of 2-tuples, one at a time."""
    if isinstance(items, Mapping):
        yield from items.items()
        return
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise ConfigError(f"{what} must be a mapping or an iterable of (name, value) pairs, got "
                          f"{type(items).__name__}", field="blocks")
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            raise ConfigError(f"{what}: expected (name, value) pairs, got {type(item).__name__}", field="blocks")
        yield item
        del item  # the caller may drop the value before the next one is produced


def _iter_blocks(blocks: Blocks) -> Iterator[Tuple[str, Iterator[Tuple[str, "torch.Tensor"]]]]:
    _is_streamed(blocks)  # type check
    seen = set()
    for block_name, tensors in _pairs(blocks, "blocks"):
        if not isinstance(block_name, str):
            raise ConfigError(f"block names must be strings, got {block_name!r}", field="blocks")
        if block_name in seen:
            # A mapping cannot repeat a name; a stream can. The writer would refuse it too, after writing.
            raise ConfigError(f"block '{block_name}' appears twice", field="blocks")
        seen.add(block_name)
        if not isinstance(tensors, Mapping) and (isinstance(tensors, (str, bytes))
                                                 or not isinstance(tensors, Iterable)):
            raise ConfigError(f"block '{block_name}' must map tensor names to tensors, got {type(tensors).__name__}",
                              field="blocks")

        def tensors_of(block_name: str = block_name, tensors: BlockTensors = tensors):
            for name, tensor in _pairs(tensors, f"block '{block_name}'"):
                if not isinstance(name, str):
                    raise ConfigError(f"block '{block_name}': tensor names must be strings, got {name!r}",
                                      field="blocks")
                # Converted one at a time, so at most one host copy of a device tensor exists at once.
                yield name, _as_host_tensor(tensor, block_name, name)
                del tensor

        yield block_name, tensors_of()
        del tensors, tensors_of  # this block's tensors may be freed before the next block is produced


def _total_bytes(blocks: Any) -> Optional[int]:
    """The bytes of a mapping of mappings of tensors, for the progress bar; None when it is anything else (bad input
    is reported by the writer's own checks, with their messages)."""
    total = 0
    for tensors in blocks.values():
        if not isinstance(tensors, Mapping):
            return None
        for tensor in tensors.values():
            if not (hasattr(tensor, "numel") and hasattr(tensor, "element_size")):
                return None
            total += int(tensor.numel()) * int(tensor.element_size())
    return total


def _nbytes(tensor: "torch.Tensor") -> int:
    return tensor.numel() * tensor.element_size()


def _fingerprint_builder(blocks: Blocks) -> "_core.FingerprintBuilder":
    builder = _core.FingerprintBuilder()
    for block_name, tensors in _iter_blocks(blocks):
        builder.add_block(block_name)
        for name, tensor in tensors:
            builder.add_tensor(name, _dtype_name(tensor), list(tensor.shape))
            builder.add_bytes(tensor.data_ptr(), _nbytes(tensor))
    return builder


def fingerprint(blocks: Blocks) -> str:
    """The content fingerprint (32 hex digits) a model of these blocks gets (docs/format.md §6).

    It depends only on names, dtypes, shapes and bytes: not on chunk size, compression, store or block order.
    ``blocks`` takes the forms :func:`write_model` takes (an iterable of pairs is consumed).
    """
    return _fingerprint_builder(blocks).finish()


# ---- storage directory ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _model_lock(storage: "_core.StorageDirectory", model_id: str):
    """Holds locks/<model-id>.lock (an advisory flock that only avoids duplicate work)."""
    lock = storage.lock_model(model_id)
    try:
        yield
    finally:
        del lock  # the only reference: the C++ destructor closes the descriptor and drops the flock now


def _open_storage(path: PathLike, create: bool) -> "_core.StorageDirectory":
    root = os.fspath(path)
    if not isinstance(root, str):
        root = os.fsdecode(root)
    if create:
        return _core.StorageDirectory.open_or_create(root)
    return _core.StorageDirectory.open_existing(root)


def _metadata_dict(metadata: Optional[Mapping[str, str]]) -> Dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ConfigError(f"metadata must be a mapping of str -> str, got {type(metadata).__name__}",
                          field="metadata")
    out: Dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"metadata entry {key!r}: keys and values must be str (serialise other values, "
                              "e.g. with json.dumps)", field="metadata")
        out[key] = value
    return out


def _tensor_chunk_sizes(sizes: Optional[Mapping[str, int]]) -> Dict[str, int]:
    """``tensor_chunk_sizes`` checked for types (the writer checks the values, naming the tensor)."""
    if sizes is None:
        return {}
    if not isinstance(sizes, Mapping):
        raise ConfigError(f"tensor_chunk_sizes must map tensor names to chunk sizes, got {type(sizes).__name__}",
                          field="tensor_chunk_sizes")
    for name, size in sizes.items():
        if not isinstance(name, str) or isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ConfigError(f"tensor_chunk_sizes entry {name!r}: {size!r} is not a chunk size in bytes (a "
                              "positive int)", field="tensor_chunk_sizes")
    return dict(sizes)


def _existing_result(storage: "_core.StorageDirectory", model_id: str) -> SaveResult:
    reader = _core.StoreReader.open(storage, model_id)
    return SaveResult(model_id=model_id, fingerprint=reader.fingerprint, outcome="already_existed",
                      raw_bytes=sum(t["nbytes"] for t in reader.tensors()), stored_bytes=reader.data_size)


def write_model(storage_path: PathLike, blocks: Blocks, *, model_id: Optional[str] = None,
                chunk_size: int = _core.DEFAULT_CHUNK_SIZE, compression_level: int = 0, replace: bool = False,
                metadata: Optional[Mapping[str, str]] = None, progress: Optional[bool] = None,
                total_bytes: Optional[int] = None, tensor_chunk_sizes: Optional[Mapping[str, int]] = None
                ) -> SaveResult:
    """Writes ``blocks`` (block name -> tensor name -> tensor, in mapping order) as one model and publishes it.

    The storage directory is created if needed. Tensors may live on any device; each is copied to contiguous
    host memory one at a time (no copy for tensors that already are) and written with its exact bytes.

    Streaming form: ``blocks`` may also be an iterable of ``(block name, tensors)`` pairs, and each block's
    ``tensors`` an iterable of ``(tensor name, tensor)`` pairs, for instance generators that load each block (or
    tensor) when the writer reaches it: each is written before the next is asked for, so only about one block needs
    to be in memory at once, whatever the model's size. Such a stream is read once, so it needs a named
    ``model_id`` (a fingerprint id would need a second pass over the weights; ConfigError otherwise); when that
    model already exists (``"already_existed"``) the stream is not read at all.

    ``model_id=None`` stores the model under ``fp-<fingerprint>``: when a model with that id exists, nothing is
    written and the outcome is ``"already_existed"`` (the same weights offloaded twice are stored once). A model
    that exists is kept (``"already_existed"``) unless ``replace=True``, which rewrites it (with this call's chunk
    size and compression) and replaces it atomically.

    ``chunk_size`` (bytes, a multiple of 4096 in [4 KiB, 64 MiB]) is the unit of checksums and compression;
    ``tensor_chunk_sizes`` (tensor name -> bytes, a multiple of 4096 from 4 KiB up to ``chunk_size``) gives some
    tensors smaller chunks, for tensors read in small pieces: an embedding read by rows (torch/rows.py) reads,
    verifies and decodes only the chunks that hold its rows. ``compression_level`` is 0 (off) or 1-9 (floats: the
    exponent codec, from 6 also zstd, the smaller kept; other dtypes 1-3: lz4, 4-9: zstd; chunks that do not shrink
    stay raw).

    ``progress``: a progress bar (bytes written, GB/s, ETA, the tensor being written) for writes longer than a couple
    of seconds; None: on a terminal unless TENSORSTREAM_PROGRESS=0 (progress.py). ``total_bytes``: the bytes a
    streamed ``blocks`` will produce, for the bar's ETA (a mapping's total is known).

    Raises ConfigError for invalid arguments (model id, chunk size, level, names, tensors), IoError when the
    file system fails (the previous model of that id, if any, is untouched).
    """
    show_progress = progress_enabled(progress)
    metadata_map = _metadata_dict(metadata)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise ConfigError(f"chunk_size must be an int, got {chunk_size!r}", field="chunk_size")
    if isinstance(compression_level, bool) or not isinstance(compression_level, int):
        raise ConfigError(f"compression_level must be an int in 0..9, got {compression_level!r}",
                          field="compression_level")
    if model_id is not None and (not isinstance(model_id, str) or not _core.is_valid_model_id(model_id)):
        raise ConfigError(f"{model_id!r} is not a valid model id (1-128 of [A-Za-z0-9._-], not starting with "
                          "'.' or '-')", field="model_id")
    if _is_streamed(blocks) and model_id is None:
        raise ConfigError("blocks given as a stream of (name, tensors) pairs can be read only once: pass a "
                          "model_id (a content fingerprint id needs a pass over every weight before writing), or a "
                          "mapping", field="model_id")
    own_chunk_sizes = _tensor_chunk_sizes(tensor_chunk_sizes)
    storage = _open_storage(storage_path, create=True)

    def new_writer(target_id: str) -> "_core.StoreWriter":
        # Validates chunk_size, compression_level and metadata (ConfigError) and creates a flock'ed temp dir.
        return _core.StoreWriter(storage, target_id, chunk_size=chunk_size, compression_level=compression_level,
                                 replace=replace, metadata=metadata_map)

    if model_id is None:
        # Validate the options before hashing a possibly large model; the writer is discarded if unused.
        writer = new_writer("")
        target = "fp-" + fingerprint(blocks)
    else:
        writer = None
        target = model_id

    try:
        with _model_lock(storage, target):
            if storage.has_model(target) and not replace:
                writer = None  # the only reference: its temp directory is removed now
                return _existing_result(storage, target)
            if writer is None:
                writer = new_writer(target)
            if total_bytes is None and not _is_streamed(blocks):
                total_bytes = _total_bytes(blocks)
            written: set = set()
            with WriteProgress(show_progress, total_bytes, f"writing {target}") as bar:
                for block_name, tensors in _iter_blocks(blocks):
                    writer.begin_block(block_name)
                    for name, tensor in tensors:
                        nbytes = _nbytes(tensor)
                        writer.add_tensor(name, _dtype_name(tensor), list(tensor.shape), tensor.data_ptr(), nbytes,
                                          chunk_size=own_chunk_sizes.get(name, 0))
                        bar.tensor_written(name, nbytes)
                        written.add(name)
                        del tensor  # a host copy of a device tensor is freed before the next one is made
                    del tensors  # and a streamed block before the next block is produced
                unknown = sorted(set(own_chunk_sizes) - written)
                if unknown:
                    raise ConfigError(f"tensor_chunk_sizes names {unknown[:3]}, which the model does not have",
                                      field="tensor_chunk_sizes")
                out = writer.commit()
    finally:
        # A failed write's temp directory is removed now, not when the traceback (which holds this frame) dies.
        writer = None
    return SaveResult(model_id=out["model_id"], fingerprint=out["fingerprint"], outcome=out["outcome"],
                      raw_bytes=out["raw_bytes"], stored_bytes=out["stored_bytes"])


class Storage:
    """A storage directory: ``STORE`` identity plus many models (docs/format.md §1).

    ``Storage(path)`` creates the directory when it does not exist; ``create=False`` requires an existing one
    (IoError with errno ENOENT otherwise).
    """

    def __init__(self, path: PathLike, create: bool = True) -> None:
        self._dir = _open_storage(path, create)

    @property
    def path(self) -> pathlib.Path:
        return pathlib.Path(self._dir.root)

    @property
    def store_id(self) -> str:
        """32 hex digits identifying this storage directory (part of every chunk checksum)."""
        return self._dir.store_id

    def models(self) -> List[str]:
        """Ids of the published models, sorted."""
        return [m for m in self._dir.list_models() if self._dir.has_model(m)]

    def __contains__(self, model_id: object) -> bool:
        return isinstance(model_id, str) and _core.is_valid_model_id(model_id) and self._dir.has_model(model_id)

    def __iter__(self) -> Iterator[str]:
        return iter(self.models())

    def __len__(self) -> int:
        return len(self.models())

    def open(self, model_id: str) -> "ModelStore":
        """Opens a published model. IoError (ENOENT) when there is none, FormatError when it breaks the format."""
        return ModelStore(self._dir, model_id)

    def remove(self, model_id: str) -> None:
        """Removes a published model atomically. IoError (ENOENT) when there is none."""
        with _model_lock(self._dir, model_id):
            self._dir.remove_model(model_id)

    def write(self, blocks: Blocks, **kwargs: Any) -> SaveResult:
        """Same as :func:`write_model` on this storage directory."""
        return write_model(self._dir.root, blocks, **kwargs)

    def __repr__(self) -> str:
        return f"Storage({str(self.path)!r})"


class ModelStore:
    """Read access to one published model. Obtain with :func:`open_model` or :meth:`Storage.open`.

    Reads verify chunk checksums (unless ``verify_checksums=False``) and never return corrupt bytes: a bad chunk
    raises CorruptionError naming the model, tensor, chunk and file offset. Reads may run from several threads at
    once; call :meth:`close` only when none is in progress.
    """

    def __init__(self, storage: "_core.StorageDirectory", model_id: str) -> None:
        if not isinstance(model_id, str):
            raise ConfigError(f"model id must be a str, got {type(model_id).__name__}", field="model_id")
        self._storage = storage
        self._fd = -1
        self._reader: Optional[_core.StoreReader] = None
        self._open(storage, model_id)
        self._tensors: List[Dict[str, Any]] = self._reader.tensors()
        self._blocks: List[Dict[str, Any]] = self._reader.blocks()
        self._tensor_index: Dict[str, int] = {t["name"]: i for i, t in enumerate(self._tensors)}
        self._block_index: Dict[str, int] = {b["name"]: i for i, b in enumerate(self._blocks)}
        self.model_id: str = self._reader.model_id
        self.fingerprint: str = self._reader.fingerprint
        self.metadata: Dict[str, str] = dict(self._reader.metadata)
        self.chunk_size: int = self._reader.chunk_size
        self.data_size: int = self._reader.data_size
        self.data_path: str = self._reader.data_path

    def _open(self, storage: "_core.StorageDirectory", model_id: str) -> None:
        # map() needs a descriptor of the very data file the reader validated. A model replaced between two
        # open() calls would pair the new file with the old manifest, so open ours first and check afterwards that
        # the path still names the same file (then the reader, opened in between, saw that file too).
        data_path = os.path.join(storage.model_dir(model_id), "data")
        for _attempt in range(8):
            try:
                fd = os.open(data_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                fd = -1  # no such model: let the engine raise its IoError, which names the model
            try:
                reader = _core.StoreReader.open(storage, model_id)
                if fd < 0:
                    continue
                mine = os.fstat(fd)
                try:
                    now = os.stat(data_path)
                except FileNotFoundError:
                    continue  # removed meanwhile: the next attempt reports it
                if (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino):
                    self._reader, self._fd, fd = reader, fd, -1
                    return
            finally:
                if fd >= 0:
                    os.close(fd)
        raise IoError(errno.EAGAIN, f"model '{model_id}' was replaced {_attempt + 1} times while being opened",
                      data_path)

    # -- lifetime ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Releases the data file. Tensors already returned (including mapped ones) stay valid."""
        self._reader = None
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._reader is None

    def __enter__(self) -> "ModelStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live_reader(self) -> "_core.StoreReader":
        reader = self._reader
        if reader is None:
            raise ValueError(f"model '{self.model_id}' was closed")
        return reader

    # -- index ---------------------------------------------------------------------------------------------------

    def tensor_names(self) -> List[str]:
        """Tensor names in manifest (data-file) order."""
        return [t["name"] for t in self._tensors]

    def block_names(self) -> List[str]:
        """Block names in data-file order."""
        return [b["name"] for b in self._blocks]

    def block_tensor_names(self, block: str) -> List[str]:
        """Names of the tensors of ``block``, in order."""
        return [self._tensors[i]["name"] for i in self._block(block)["tensors"]]

    def __contains__(self, name: object) -> bool:
        return name in self._tensor_index

    def __len__(self) -> int:
        return len(self._tensors)

    def _index(self, name: str) -> int:
        try:
            return self._tensor_index[name]
        except (KeyError, TypeError):
            raise KeyError(f"model '{self.model_id}' has no tensor {name!r}") from None

    def _block(self, name: str) -> Dict[str, Any]:
        try:
            return self._blocks[self._block_index[name]]
        except (KeyError, TypeError):
            raise KeyError(f"model '{self.model_id}' has no block {name!r}") from None

    def info(self, name: str) -> Dict[str, Any]:
        """What the manifest says about tensor ``name``.

        Keys: index, name, dtype, shape, nbytes, block (index), block_name, slot_offset, stored_bytes, chunks,
        chunk_size (raw bytes per chunk: the model's, or the tensor's own, docs/format.md §4),
        raw_file_offset (file offset when every chunk is stored raw, so :meth:`map` works; else None),
        compressed (bool).
        """
        info = dict(self._tensors[self._index(name)])
        info["shape"] = list(info["shape"])
        info["block_name"] = self._blocks[info["block"]]["name"]
        info["compressed"] = info["raw_file_offset"] is None and info["nbytes"] > 0
        return info

    def block_info(self, name: str) -> Dict[str, Any]:
        """What the manifest says about block ``name``: offset, stored_bytes, slot_size, all_raw, tensors."""
        info = dict(self._block(name))
        info["tensors"] = [self._tensors[i]["name"] for i in info["tensors"]]
        return info

    # -- reading -------------------------------------------------------------------------------------------------

    def read(self, name: str, verify_checksums: bool = True) -> "torch.Tensor":
        """A new CPU tensor holding tensor ``name``, read (and checked) by the engine straight into its memory."""
        import torch

        reader = self._live_reader()
        index = self._index(name)
        info = self._tensors[index]
        out = torch.empty(list(info["shape"]), dtype=_torch_dtype(info["dtype"]))
        reader.read_tensor(index, out.data_ptr(), info["nbytes"], verify_checksums=verify_checksums)
        return out

    def read_rows(self, name: str, rows: Any, verify_checksums: bool = True) -> "torch.Tensor":
        """Rows ``rows`` (indices along the first dimension, sorted and unique) of tensor ``name`` as a new
        ``(len(rows), *shape[1:])`` tensor. Only the stored chunks that hold those rows are read (each once),
        verified and decoded; ConfigError for a row out of range or rows not sorted and unique."""
        import torch

        reader = self._live_reader()
        index = self._index(name)
        info = self._tensors[index]
        shape = list(info["shape"])
        if not shape or shape[0] == 0:
            raise ConfigError(f"tensor '{name}' of shape {shape} has no rows", field="rows")
        rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1).contiguous()
        out = torch.empty([rows.numel()] + shape[1:], dtype=_torch_dtype(info["dtype"]))
        reader.read_rows(index, info["nbytes"] // shape[0], rows.data_ptr(), rows.numel(), out.data_ptr(),
                         out.numel() * out.element_size(), verify_checksums=verify_checksums)
        return out

    def read_block(self, name: str, verify_checksums: bool = True) -> Dict[str, "torch.Tensor"]:
        """Every tensor of block ``name``, read with one engine call into one slot buffer.

        The tensors are views of that buffer at their slot offsets (256-byte aligned), so they share memory.
        """
        import torch

        reader = self._live_reader()
        block = self._block(name)
        index = self._block_index[name]
        slot = torch.empty(block["slot_size"], dtype=torch.uint8)
        reader.read_block(index, slot.data_ptr(), block["slot_size"], verify_checksums=verify_checksums)
        out: Dict[str, torch.Tensor] = {}
        for t in block["tensors"]:
            info = self._tensors[t]
            start = info["slot_offset"]
            view = slot[start:start + info["nbytes"]].view(_torch_dtype(info["dtype"]))
            out[info["name"]] = view.view(list(info["shape"]))
        return out

    def read_all(self, verify_checksums: bool = True) -> Dict[str, "torch.Tensor"]:
        """Every tensor of the model, by name, in manifest order (each in its own memory)."""
        return {t["name"]: self.read(t["name"], verify_checksums) for t in self._tensors}

    def map(self, name: str) -> "torch.Tensor":
        """Tensor ``name`` as a zero-copy view of the data file (memory-mapped), without reading it.

        Only tensors stored raw can be mapped (ConfigError otherwise: use :meth:`read`). **No checksum is
        verified**: a corrupt byte on disk shows up in the tensor. Use :meth:`read` (or
        ``verify_storage_integrity``) when the bytes must be checked. The mapping is private copy-on-write: the
        tensor may be modified in memory, the file never is. It stays valid after :meth:`close`.
        """
        import torch

        self._live_reader()
        info = self._tensors[self._index(name)]
        dtype = _torch_dtype(info["dtype"])
        shape = list(info["shape"])
        if info["nbytes"] == 0:
            return torch.empty(shape, dtype=dtype)
        offset = info["raw_file_offset"]
        if offset is None:
            raise ConfigError(f"tensor '{info['name']}' of model '{self.model_id}' is stored compressed and cannot "
                              "be memory-mapped; use read()", field="map")
        # Map only the pages that hold the tensor: the whole data file may be larger than RAM.
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(self._fd, offset - start + info["nbytes"], access=mmap.ACCESS_COPY, offset=start)
        # frombuffer keeps a reference to the mapping for the tensor's lifetime.
        flat = torch.frombuffer(mapping, dtype=torch.uint8, count=info["nbytes"], offset=offset - start)
        return flat.view(dtype).view(shape)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._blocks)} blocks, {len(self._tensors)} tensors"
        return f"<ModelStore {self.model_id!r}: {state}>"


def open_model(storage_path: PathLike, model_id: str) -> ModelStore:
    """Opens model ``model_id`` of an existing storage directory for reading."""
    return Storage(storage_path, create=False).open(model_id)
