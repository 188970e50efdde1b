"""User configuration: the deployment guide's ``tensorstream.Config`` and its enums.

Every field is validated when the config is created and when it is used (fields may be assigned afterwards, as
in the guide: ``config.backend = BackendType.MMAP``); an invalid value raises ``ConfigError`` naming the field and
the allowed values.

Precedence, for every field: a value passed to ``Config(...)`` (or assigned later), else its environment variable,
else the default. ``TENSORSTREAM_STORAGE_PATH``, ``TENSORSTREAM_VRAM_BUDGET`` and ``TENSORSTREAM_TRACE`` fill
``storage_path``, ``vram_budget_gb`` and ``trace_path``; the engine-level variables (``TENSORSTREAM_BACKEND``,
``_DIRECT_IO``, ``_IO_THREADS``, ``_QUEUE_DEPTH``, ``_PREFETCH``, ``_MEMORY_PRESSURE``, ``_VERIFY_CHECKSUMS``) are
parsed by the C++ core (``Config::from_env``), the one parser of them, whose ConfigError names the variable.
docs/configuration.md lists them all.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from typing import Any, Dict, Optional

from . import _core
from .errors import ConfigError


class BackendType(str, enum.Enum):
    """How weights reach the execution device.

    AUTO picks io_uring when the kernel allows it, else a pread thread pool. PREAD and IO_URING force one of them.
    MMAP maps the store for CPU execution (zero-copy views of uncompressed blocks). CUDA streams into GPU memory
    through pinned staging buffers; GPUDIRECT reads storage straight into GPU memory with cuFile. The two GPU kinds
    need the GPU transfer stage, which this build does not have yet: choosing them raises ConfigError.
    """

    AUTO = "auto"
    PREAD = "pread"
    IO_URING = "io_uring"
    MMAP = "mmap"
    CUDA = "cuda"
    GPUDIRECT = "gpudirect"


class PrefetchStrategy(str, enum.Enum):
    """What to load ahead of use: nothing, the next layer(s), or a learned order with a measured lookahead."""

    NONE = "none"
    NEXT_LAYER = "next_layer"
    ADAPTIVE = "adaptive"


MEMORY_PRESSURE_MODES = ("conservative", "balanced", "aggressive")
DIRECT_IO_MODES = ("auto", "on", "off")
MAX_IO_THREADS = 64
MAX_QUEUE_DEPTH = 4096

# The engine-level fields and the key of each in _core.config_from_env(): None in a Config means "not given", and
# is filled from the environment (or the engine's default) by the C++ parser.
_ENGINE_FIELDS = {"backend": "backend", "direct_io": "direct_io", "num_io_threads": "num_io_threads",
                  "queue_depth": "queue_depth", "prefetch_strategy": "prefetch_strategy",
                  "memory_pressure_mode": "memory_pressure_mode", "verify_checksums": "verify_checksums"}


def device_backends() -> tuple:
    """The BackendTypes whose slots live in device memory (from the engine's one backend table)."""
    return tuple(BackendType(entry["name"]) for entry in _core.backend_table() if entry["device_slots"])


def _env_budget() -> Optional[float]:
    text = os.environ.get("TENSORSTREAM_VRAM_BUDGET")
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"invalid TENSORSTREAM_VRAM_BUDGET: {text!r} is not a number of gigabytes",
                          field="TENSORSTREAM_VRAM_BUDGET") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"invalid TENSORSTREAM_VRAM_BUDGET: {text!r} must be a positive number of gigabytes",
                          field="TENSORSTREAM_VRAM_BUDGET")
    return value


def check_trace_path(value: Any, field: str) -> str:
    """``value`` as a str path where a trace file can be written, or ConfigError naming ``field``.

    The parent directory must exist and be writable now (the trace is written when the model is cleaned up, which
    is a bad moment to learn that it cannot be), and the path must not be a directory.
    """
    try:
        path = os.fspath(value)
    except TypeError:
        path = None
    if not isinstance(path, str) or path == "" or "\0" in path:
        raise ConfigError(f"invalid {field}: {value!r} must be a file path (str) for the Chrome trace JSON, or None",
                          field=field)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or path.endswith(os.sep):
        raise ConfigError(f"invalid {field}: {path!r} is a directory; give the trace file's path "
                          "(e.g. /tmp/trace.json)", field=field)
    if not os.path.isdir(parent):
        raise ConfigError(f"invalid {field}: the directory {parent!r} of {path!r} does not exist", field=field)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"invalid {field}: the directory {parent!r} of {path!r} is not writable", field=field)
    return path


def _env_trace() -> Optional[str]:
    text = os.environ.get("TENSORSTREAM_TRACE")
    if text is None or text == "":
        return None
    return check_trace_path(text, "TENSORSTREAM_TRACE")


@dataclasses.dataclass
class Config:
    """TensorStream settings (the deployment guide's fields).

    storage_path: directory of the store (many models; content-addressed). Default: TENSORSTREAM_STORAGE_PATH.
    vram_budget_gb: gigabytes (1e9 bytes) of streamed weights held on the execution device at once, resident and in
        flight (activations and KV cache are outside it). Default: TENSORSTREAM_VRAM_BUDGET, else a quarter of the
        streamed weights (at least one block).
    backend: a BackendType (or its value as a string). Default: TENSORSTREAM_BACKEND, else AUTO.
    prefetch_strategy: a PrefetchStrategy (or its value). Default: TENSORSTREAM_PREFETCH, else ADAPTIVE.
    compression_enabled / compression_level: store chunks compressed (floats: the exponent codec, from 6 also zstd,
        the smaller kept; other dtypes: 1-3 lz4, 4-9 zstd; see docs/format.md §5).
    num_io_threads: 1..64 workers that read, verify and decode. Default: TENSORSTREAM_IO_THREADS, else 4.
    memory_pressure_mode: "conservative", "balanced" or "aggressive" (docs/configuration.md). Default:
        TENSORSTREAM_MEMORY_PRESSURE, else "balanced".
    verify_checksums: verify every chunk's checksum on every load. Default: TENSORSTREAM_VERIFY_CHECKSUMS, else True.
    direct_io: "auto" (O_DIRECT for blocks not in the page cache; cached ones mapped), "on" or "off". Default:
        TENSORSTREAM_DIRECT_IO, else "auto".
    queue_depth: 1..4096 chunk reads in flight at once. Default: TENSORSTREAM_QUEUE_DEPTH, else 32.
    device: where the offloaded model computes: "cpu" (default) or "cuda" / "cuda:N" (slots and the resident set in
        that GPU's memory; vram_budget_gb then bounds both). ``offload(..., device=)`` and ``model.to(device)`` after
        offload do the same. Default: TENSORSTREAM_DEVICE, else "cpu".
    host_cache_gb: on a GPU, gigabytes of pinned RAM that keep decoded blocks after they leave VRAM, so later passes
        copy them at host-to-device speed instead of reading storage (0 disables it). Default:
        TENSORSTREAM_HOST_CACHE_GB, else what the machine can spare (available memory, within the cgroup limit,
        less 2 GB or 10 %, whichever is more). Unused on the CPU.
    progress: a progress bar while offload writes the store (bytes, GB/s, ETA, tensor) when it takes more than a
        couple of seconds. Default None: on a terminal, unless TENSORSTREAM_PROGRESS=0.
    debug_mode: log per-block timings to the ``tensorstream`` logger.
    min_layer_size: blocks whose weights total fewer bytes stay resident instead of streaming.
    trace_path: write a Chrome trace (trace-event JSON: reads, checksums, decodes, waits and compute per block, on a
        timeline) to this file when the model is cleaned up, and on ``tensorstream.write_trace(model)``; its
        directory must exist and be writable. Default: TENSORSTREAM_TRACE, else None (no tracing).
    """

    storage_path: Optional[str] = None
    vram_budget_gb: Optional[float] = None
    backend: Optional[BackendType] = None
    prefetch_strategy: Optional[PrefetchStrategy] = None
    compression_enabled: bool = False
    compression_level: int = 5
    num_io_threads: Optional[int] = None
    memory_pressure_mode: Optional[str] = None
    verify_checksums: Optional[bool] = None
    debug_mode: bool = False
    min_layer_size: int = 1 << 20
    trace_path: Optional[str] = None
    direct_io: Optional[str] = None
    queue_depth: Optional[int] = None
    device: Optional[str] = None
    host_cache_gb: Optional[float] = None
    progress: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.storage_path is None:
            self.storage_path = os.environ.get("TENSORSTREAM_STORAGE_PATH") or None
        if self.vram_budget_gb is None:
            self.vram_budget_gb = _env_budget()
        if self.trace_path is None:
            self.trace_path = _env_trace()
        if self.device is None:
            self.device = os.environ.get("TENSORSTREAM_DEVICE") or "cpu"
        wants_host_cache = self.host_cache_gb is None and bool(os.environ.get("TENSORSTREAM_HOST_CACHE_GB"))
        if wants_host_cache or any(getattr(self, field) is None for field in _ENGINE_FIELDS):
            from_env = _core.config_from_env()  # strict: a malformed variable is a ConfigError naming it
            for field, key in _ENGINE_FIELDS.items():
                if getattr(self, field) is None:
                    setattr(self, field, from_env[key])
            if wants_host_cache:
                self.host_cache_gb = from_env["host_cache_bytes"] / 1e9
        self.validate()

    def validate(self) -> "Config":
        """Checks every field (and normalizes enum strings); raises ConfigError naming the first bad one."""
        if self.storage_path is None or str(self.storage_path) == "":
            raise ConfigError("invalid storage_path: not set (pass storage_path= or set TENSORSTREAM_STORAGE_PATH)",
                              field="storage_path")
        self.storage_path = os.fspath(self.storage_path)
        if self.vram_budget_gb is not None:
            if isinstance(self.vram_budget_gb, bool) or not isinstance(self.vram_budget_gb, (int, float)) \
                    or not math.isfinite(self.vram_budget_gb) or self.vram_budget_gb <= 0:
                raise ConfigError(f"invalid vram_budget_gb: {self.vram_budget_gb!r} must be a positive number of "
                                  "gigabytes (or None for the default)", field="vram_budget_gb")
        self.backend = _enum_field("backend", BackendType, self.backend)
        self.prefetch_strategy = _enum_field("prefetch_strategy", PrefetchStrategy, self.prefetch_strategy)
        _bool_field("compression_enabled", self.compression_enabled)
        _int_field("compression_level", self.compression_level, 1, 9)
        _int_field("num_io_threads", self.num_io_threads, 1, MAX_IO_THREADS)
        _int_field("queue_depth", self.queue_depth, 1, MAX_QUEUE_DEPTH)
        if self.direct_io not in DIRECT_IO_MODES:
            raise ConfigError(f"invalid direct_io: {self.direct_io!r} is not one of {', '.join(DIRECT_IO_MODES)}",
                              field="direct_io")
        if self.memory_pressure_mode not in MEMORY_PRESSURE_MODES:
            raise ConfigError(f"invalid memory_pressure_mode: {self.memory_pressure_mode!r} is not one of "
                              f"{', '.join(MEMORY_PRESSURE_MODES)}", field="memory_pressure_mode")
        _bool_field("verify_checksums", self.verify_checksums)
        self.device = _device_field(self.device)
        if self.progress is not None and not isinstance(self.progress, bool):
            raise ConfigError(f"invalid progress: {self.progress!r} must be True, False or None (on a terminal)",
                              field="progress")
        if self.host_cache_gb is not None:
            if isinstance(self.host_cache_gb, bool) or not isinstance(self.host_cache_gb, (int, float)) \
                    or not math.isfinite(self.host_cache_gb) or self.host_cache_gb < 0:
                raise ConfigError(f"invalid host_cache_gb: {self.host_cache_gb!r} must be a number of gigabytes >= 0 "
                                  "(0 disables the host tier; None: what the machine can spare)", field="host_cache_gb")
        _bool_field("debug_mode", self.debug_mode)
        _int_field("min_layer_size", self.min_layer_size, 0, 1 << 62)
        if self.trace_path is not None:
            self.trace_path = check_trace_path(self.trace_path, "trace_path")
        return self

    @property
    def host_cache_bytes(self) -> int:
        """Bytes of the host tier: host_cache_gb, else what the machine can spare now."""
        if self.host_cache_gb is not None:
            return int(self.host_cache_gb * 1e9)
        return spare_memory_bytes()

    @property
    def budget_bytes(self) -> Optional[int]:
        return None if self.vram_budget_gb is None else int(self.vram_budget_gb * 1e9)

    @property
    def store_compression_level(self) -> int:
        """The compression level the store is written with (0 when compression is off)."""
        return self.compression_level if self.compression_enabled else 0

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["backend"] = self.backend.value
        out["prefetch_strategy"] = self.prefetch_strategy.value
        return out


def _enum_field(name: str, enum_type: type, value: Any) -> Any:
    try:
        return enum_type(value.value if isinstance(value, enum.Enum) else value)
    except ValueError:
        allowed = ", ".join(f"{enum_type.__name__}.{member.name}" for member in enum_type)
        raise ConfigError(f"invalid {name}: {value!r} is not one of {allowed}", field=name) from None


def spare_memory_bytes() -> int:
    """Memory this process could use without pushing the machine into swap: MemAvailable, within the cgroup's
    limit, less a margin of 2 GB or 10 %, whichever is more (0 when that is negative)."""
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        return 0
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_path) as limit_file, open(usage_path) as usage_file:
                limit_text, usage = limit_file.read().strip(), int(usage_file.read().strip())
        except (OSError, ValueError):
            continue
        if limit_text.isdigit() and int(limit_text) < (1 << 60):
            available = min(available, max(int(limit_text) - usage, 0))
        break
    return max(available - max(2_000_000_000, available // 10), 0)


def _device_field(value: Any) -> str:
    """"cpu", "cuda" or "cuda:N" (a torch.device is taken by its string); whether the device exists is checked when
    a model is offloaded to it."""
    text = str(value) if value is not None and type(value).__name__ == "device" else value
    if isinstance(text, str):
        kind, _, index = text.partition(":")
        if kind == "cpu" and not index or kind == "cuda" and (not index or index.isdigit()):
            return text
    raise ConfigError(f"invalid device: {value!r} is not one of 'cpu', 'cuda', 'cuda:N'", field="device")


def _bool_field(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"invalid {name}: {value!r} must be True or False", field=name)


def _int_field(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"invalid {name}: {value!r} must be an integer in {low}..{high}", field=name)


def create_default_config(storage_path: Optional[str] = None) -> Config:
    """A Config with the defaults for ``storage_path`` (or TENSORSTREAM_STORAGE_PATH)."""
    return Config(storage_path=os.fspath(storage_path) if storage_path is not None else None)


__all__ = ["Config", "BackendType", "PrefetchStrategy", "create_default_config", "MEMORY_PRESSURE_MODES",
           "DIRECT_IO_MODES"]
