"""The deployment guide's production validation suite (``tensorstream validate``).

:func:`run_validation` checks, in order:

1. the environment: Python (3.8 or newer), PyTorch (2.0 or newer), the ``_core`` extension, io_uring (for
   information: without it the engine reads with a pread thread pool), CPUs, RAM, CUDA (for information);
2. the storage path: it exists or can be created, a file can be created, written, fsynced and deleted in it, it
   has at least 1 GiB free, and how fast it reads: a 256 MiB file is written, evicted from the page cache with
   ``posix_fadvise(DONTNEED)`` and read back sequentially with ``O_DIRECT`` where the file system allows it;
3. a small model end to end: a tiny Llama (``LlamaForCausalLM`` from a ``LlamaConfig``, seeded random weights)
   generates 8 tokens greedily, is offloaded into the storage path with a budget of half its weights, generates
   again, and must produce the same tokens; the stored model must then pass ``verify_storage_integrity``.

Each check is a :class:`Check` with status ``PASS``, ``FAIL`` or ``INFO`` (information, or a check skipped
because an earlier one failed). The suite passes when no check FAILs. Nothing the suite writes stays behind:
the probe files are deleted, and the test model is removed from the store unless it was there before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import __version__

PASS = "PASS"
FAIL = "FAIL"
INFO = "INFO"

MIB = 1 << 20
GIB = 1 << 30
MIN_FREE_BYTES = GIB
READ_TEST_BYTES = 256 * MIB
SLOW_READ_MB_S = 200.0  # below this, streaming a layer costs more than computing it on most models
IO_CHUNK = 4 * MIB
MIN_PYTHON = (3, 8)
MIN_TORCH = (2, 0)
MEMORY_FILE_SYSTEMS = {"tmpfs", "ramfs", "devtmpfs"}
GENERATE_TOKENS = 8


@dataclass
class Check:
    """One row of the validation table."""

    group: str    # "environment", "storage" or "model"
    name: str
    status: str   # PASS, FAIL or INFO
    detail: str
    value: Any = None  # the measured figure, when there is one (bytes, MB/s, ...)

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def passed(checks: Sequence[Check]) -> bool:
    """True when no check FAILed."""
    return not any(c.failed for c in checks)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _size(nbytes: float) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(nbytes)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{nbytes} B"  # pragma: no cover


def _version_tuple(text: str) -> Tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


# ---- environment -------------------------------------------------------------------------------------------------


def _meminfo() -> Dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if fields and fields[0].isdigit():
                    out[key] = int(fields[0]) * 1024
    except OSError:
        pass
    return out


def check_environment() -> List[Check]:
    checks: List[Check] = []
    group = "environment"

    version = sys.version_info[:3]
    shown = ".".join(map(str, version))
    if version[:2] < MIN_PYTHON:
        checks.append(Check(group, "python", FAIL, f"Python {shown}; TensorStream needs 3.8 or newer", shown))
    else:
        newer = " (newer than the guide's tested 3.8-3.13)" if version[:2] > (3, 13) else ""
        checks.append(Check(group, "python", PASS, f"Python {shown} ({platform.python_implementation()}){newer}",
                            shown))

    checks.append(Check(group, "tensorstream", INFO, f"tensorstream {__version__} from "
                        f"{os.path.dirname(os.path.abspath(__file__))}", __version__))

    try:
        import torch
    except Exception as error:  # noqa: BLE001 - any import failure means "no usable torch"
        checks.append(Check(group, "torch", FAIL, f"PyTorch does not import ({_one_line(error)}); pip install "
                            "'torch>=2.0'"))
    else:
        if _version_tuple(torch.__version__)[:2] < MIN_TORCH:
            checks.append(Check(group, "torch", FAIL, f"PyTorch {torch.__version__}; TensorStream needs 2.0 or newer",
                                torch.__version__))
        else:
            checks.append(Check(group, "torch", PASS, f"PyTorch {torch.__version__}", torch.__version__))

    core = None
    try:
        from . import _core as core
    except Exception as error:  # noqa: BLE001
        checks.append(Check(group, "_core extension", FAIL, f"tensorstream._core does not load ({_one_line(error)});"
                            " build it (make build) or reinstall the wheel"))
    else:
        checks.append(Check(group, "_core extension", PASS, f"loaded from {core.__file__} (format version "
                            f"{core.FORMAT_VERSION})", os.path.basename(core.__file__)))

    if core is not None:
        try:
            available, reason = core.io_uring_available()
        except Exception as error:  # noqa: BLE001
            available, reason = False, _one_line(error)
        if available:
            checks.append(Check(group, "io_uring", INFO, "available (backend AUTO reads with io_uring)", True))
        else:
            checks.append(Check(group, "io_uring", INFO, f"not available ({reason or 'no reason given'}); backend "
                                "AUTO uses the pread thread pool", False))

    total = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    checks.append(Check(group, "cpus", INFO, f"{usable} usable of {total} "
                        f"({_cpu_model() or platform.machine()})", usable))

    mem = _meminfo()
    if "MemTotal" in mem:
        detail = f"{_size(mem['MemTotal'])} total, {_size(mem.get('MemAvailable', 0))} available"
        if mem["MemTotal"] < 32 * GIB:
            detail += " (the guide recommends 32 GiB or more for large models)"
        checks.append(Check(group, "ram", INFO, detail, mem["MemTotal"]))
    else:
        checks.append(Check(group, "ram", INFO, "unknown (/proc/meminfo not readable)"))

    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            checks.append(Check(group, "cuda", INFO, f"{torch.cuda.device_count()} device(s), {name}; CUDA "
                                f"{torch.version.cuda}", name))
        else:
            checks.append(Check(group, "cuda", INFO, "no CUDA device: models run on the CPU (backend AUTO/MMAP)",
                                None))
    except Exception:  # noqa: BLE001 - already reported as the torch check
        pass
    return checks


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# ---- storage -----------------------------------------------------------------------------------------------------


def _filesystem(path: str) -> str:
    path = os.path.realpath(path)
    best, best_len = "?", -1
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) > best_len:
                    best, best_len = fields[2], len(point)
    except OSError:
        pass
    return best


def _resident_fraction(path: str) -> Optional[float]:
    """The share of the file's pages in the page cache (mincore), or None when it cannot be told."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        size = os.path.getsize(path)
        if size == 0:
            return 0.0
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # private: a writable buffer for ctypes
        try:
            first = ctypes.c_char.from_buffer(mapped)
            vec = (ctypes.c_ubyte * pages)()
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(first)), ctypes.c_size_t(size), vec)
            del first
            return sum(v & 1 for v in vec) / pages if rc == 0 else None
        finally:
            mapped.close()
    except Exception:  # noqa: BLE001 - informational only
        return None


def _probe_name(directory: str, tag: str) -> str:
    return os.path.join(directory, f".tensorstream-validate-{tag}.{os.getpid()}.{os.urandom(4).hex()}")


def _write_file(path: str, nbytes: int) -> float:
    """Writes ``nbytes`` of random bytes, fsyncs; returns the seconds it took."""
    block = os.urandom(IO_CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        start = time.perf_counter()
        written = 0
        while written < nbytes:
            n = os.write(fd, memoryview(block)[:min(IO_CHUNK, nbytes - written)])
            written += n
        os.fsync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)


def _evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_file(path: str) -> Tuple[int, float, str]:
    """Reads the whole file sequentially in 4 MiB requests; O_DIRECT when the file system allows it.

    Returns (bytes, seconds, mode) with mode "O_DIRECT" or "buffered".
    """
    buffer = mmap.mmap(-1, IO_CHUNK)  # page-aligned, as O_DIRECT needs
    try:
        direct = getattr(os, "O_DIRECT", 0)
        fd, mode = -1, "buffered"
        if direct:
            try:
                fd, mode = os.open(path, os.O_RDONLY | os.O_CLOEXEC | direct), "O_DIRECT"
            except OSError as error:
                if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        if fd < 0:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            total = 0
            start = time.perf_counter()
            while True:
                try:
                    n = os.readv(fd, [buffer])
                except OSError as error:
                    if mode == "O_DIRECT" and total == 0 and error.errno == errno.EINVAL:
                        os.close(fd)  # the file system accepted the flag but not the request: read buffered
                        fd, mode = os.open(path, os.O_RDONLY | os.O_CLOEXEC), "buffered"
                        start = time.perf_counter()
                        continue
                    raise
                if n <= 0:
                    break
                total += n
            return total, time.perf_counter() - start, mode
        finally:
            os.close(fd)
    finally:
        buffer.close()


def check_storage(storage_path: str, read_test_bytes: int = READ_TEST_BYTES) -> Tuple[List[Check], bool]:
    """The storage checks; returns them and whether the path is usable for the model check."""
    checks: List[Check] = []
    group = "storage"
    path = os.path.abspath(os.path.expanduser(storage_path))

    def skipped(name: str) -> Check:
        return Check(group, name, INFO, "skipped: the storage path is unusable (see above)")

    # 1. exists or can be created
    existed = os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    except OSError as error:
        cause = error.strerror or str(error)
        checks.append(Check(group, "path", FAIL, f"{path} does not exist and cannot be created: {cause} "
                            f"(errno {error.errno}{', ' + errno.errorcode.get(error.errno, '') if error.errno else ''})"
                            + _blocking_component(path)))
        return checks + [skipped("writable"), skipped("free space"), skipped("read speed")], False
    fstype = _filesystem(path)
    checks.append(Check(group, "path", PASS, f"{path} ({'exists' if existed else 'created'}; file system {fstype})",
                        path))

    # 2. writable: create, write, fsync, delete
    probe = _probe_name(path, "probe")
    try:
        _write_file(probe, 4096)
        os.unlink(probe)
    except OSError as error:
        _unlink_quietly(probe)
        checks.append(Check(group, "writable", FAIL, f"cannot create a file in {path}: {error.strerror or error} "
                            f"(errno {error.errno})"))
        return checks + [skipped("free space"), skipped("read speed")], False
    checks.append(Check(group, "writable", PASS, "created, wrote, fsynced and deleted a file"))

    # 3. free space
    usage = shutil.disk_usage(path)
    detail = f"{_size(usage.free)} free of {_size(usage.total)}"
    if usage.free < MIN_FREE_BYTES:
        checks.append(Check(group, "free space", FAIL, detail + f"; at least {_size(MIN_FREE_BYTES)} is required "
                            "(and 1.5-2x the size of the models to store)", usage.free))
        return checks + [skipped("read speed")], False
    checks.append(Check(group, "free space", PASS, detail + " (plan 1.5-2x the size of the models to store)",
                        usage.free))

    # 4. read speed of a file evicted from the page cache
    if read_test_bytes > 0:
        checks.extend(_check_read_speed(path, fstype, read_test_bytes, usage.free))
    return checks, True


def _check_read_speed(path: str, fstype: str, nbytes: int, free: int) -> List[Check]:
    group = "storage"
    nbytes = max(IO_CHUNK, nbytes // IO_CHUNK * IO_CHUNK)
    if nbytes + 256 * MIB > free:
        return [Check(group, "read speed", INFO, f"skipped: {_size(nbytes)} test file would leave less than "
                      "256 MiB free")]
    probe = _probe_name(path, "read")
    try:
        write_s = _write_file(probe, nbytes)
        _evict(probe)
        cached = _resident_fraction(probe)
        nread, read_s, mode = _read_file(probe)
    except OSError as error:
        return [Check(group, "read speed", FAIL, f"the read test failed: {error.strerror or error} "
                      f"(errno {error.errno})")]
    finally:
        _unlink_quietly(probe)
    if nread != nbytes:
        return [Check(group, "read speed", FAIL, f"read {nread} of the {nbytes} bytes written")]
    read_mb_s = nread / read_s / 1e6 if read_s > 0 else float("inf")
    write_mb_s = nbytes / write_s / 1e6 if write_s > 0 else float("inf")
    if fstype in MEMORY_FILE_SYSTEMS:
        cache = f"{fstype}: memory, not storage"
    elif cached is None:
        cache = "page cache evicted with posix_fadvise"
    else:
        cache = f"{cached:.0%} in page cache after posix_fadvise(DONTNEED)"
    detail = f"{read_mb_s:.0f} MB/s sequential ({mode}, 4 MiB requests, {_size(nbytes)}; {cache})"
    if read_mb_s < SLOW_READ_MB_S:
        detail += f"; slow (< {SLOW_READ_MB_S:.0f} MB/s): streamed layers will wait for I/O, use an NVMe SSD"
        status = INFO
    else:
        status = PASS
    return [Check(group, "write speed", INFO, f"{write_mb_s:.0f} MB/s sequential, buffered, ending with fsync",
                  round(write_mb_s, 1)),
            Check(group, "read speed", status, detail, round(read_mb_s, 1))]


def _blocking_component(path: str) -> str:
    """Names the first ancestor of ``path`` that exists and is not a directory, if any."""
    current = path
    while True:
        parent = os.path.dirname(current)
        if os.path.lexists(current) and not os.path.isdir(current):
            return f"; {current} is a file, not a directory"
        if parent == current:
            return ""
        current = parent


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ---- a small model end to end ------------------------------------------------------------------------------------


def _offload_api() -> Tuple[Callable[..., Any], Callable[..., Any]]:
    import tensorstream

    offload = getattr(tensorstream, "offload", None)
    stats = getattr(tensorstream, "get_model_statistics", None)
    if offload is None or stats is None:
        from . import torch as ts_torch  # python/tensorstream/torch: the PyTorch integration

        offload = offload or getattr(ts_torch, "offload")
        stats = stats or getattr(ts_torch, "get_model_statistics")
    return offload, stats


def tiny_llama(seed: int = 0):
    """A 4-layer Llama with seeded random weights (~15 MB in float32; every layer above the 1 MiB
    ``min_layer_size``, so layers stream)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config).eval()
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _greedy(model, prompt, tokens: int):
    import torch

    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False)
    return out[0, prompt.shape[1]:].tolist()


def check_model(storage_path: str) -> List[Check]:
    group = "model"
    path = os.path.abspath(os.path.expanduser(storage_path))
    checks: List[Check] = []
    try:
        import torch
        import transformers  # noqa: F401
    except Exception as error:  # noqa: BLE001
        return [Check(group, "tiny Llama", FAIL, f"cannot build the test model: {_one_line(error)} (the check "
                      "needs torch and transformers: pip install 'tensorstream[all]')")]
    try:
        offload, get_stats = _offload_api()
    except Exception as error:  # noqa: BLE001
        return [Check(group, "offload", FAIL, f"tensorstream.offload is not available: {_one_line(error)}")]

    from .config import Config
    from .maintenance import verify_storage_integrity
    from .store import Storage

    try:
        before = set(Storage(path).models())
    except Exception as error:  # noqa: BLE001
        return [Check(group, "store", FAIL, f"cannot open {path} as a storage directory: {_one_line(error)}")]

    start = time.perf_counter()
    model = tiny_llama()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    expected = _greedy(model, prompt, GENERATE_TOKENS)
    model_id = None
    try:
        budget_gb = weight_bytes / 2 / 1e9
        try:
            config = Config(storage_path=path, vram_budget_gb=budget_gb)
            model = offload(model, config) or model
            stats = get_stats(model)
            model_id = stats.get("model_id")
        except Exception as error:  # noqa: BLE001
            return [Check(group, "offload", FAIL, f"offloading a {_size(weight_bytes)} Llama with a "
                          f"{_size(budget_gb * 1e9)} budget failed: {_one_line(error)}")]
        checks.append(Check(group, "offload", PASS, f"{_size(weight_bytes)} tiny Llama, budget {_size(budget_gb * 1e9)}"
                            f" (half): {stats.get('resident_blocks')} block(s) resident, {stats.get('streamed_blocks')}"
                            f" streamed, model {model_id}", model_id))

        try:
            before_read = stats.get("bytes_read", 0)
            actual = _greedy(model, prompt, GENERATE_TOKENS)
            stats = get_stats(model)
        except Exception as error:  # noqa: BLE001
            checks.append(Check(group, "generate", FAIL, f"generating with the offloaded model failed: "
                                f"{_one_line(error)}"))
            actual = None
        if actual is not None:
            read = stats.get("bytes_read", 0) - before_read
            if actual != expected:
                checks.append(Check(group, "generate", FAIL, f"{GENERATE_TOKENS} greedy tokens differ from the plain "
                                    f"model's: {actual} != {expected}", actual))
            elif stats.get("streamed_blocks", 0) and read <= 0:
                checks.append(Check(group, "generate", FAIL, "tokens equal, but nothing was read from storage although "
                                    f"{stats.get('streamed_blocks')} block(s) stream", actual))
            elif stats.get("checksum_failures", 0):
                checks.append(Check(group, "generate", FAIL, f"{stats['checksum_failures']} checksum failure(s) "
                                    "while streaming", actual))
            else:
                checks.append(Check(group, "generate", PASS, f"{GENERATE_TOKENS} greedy tokens equal to the plain "
                                    f"model's; {_size(read)} streamed from storage (backend {stats.get('backend')})",
                                    actual))

        try:
            report = verify_storage_integrity(path, model=model_id) if model_id else None
        except Exception as error:  # noqa: BLE001
            checks.append(Check(group, "integrity", FAIL, f"verify_storage_integrity failed: {_one_line(error)}"))
        else:
            if report is None:
                checks.append(Check(group, "integrity", FAIL, "get_model_statistics reports no model_id to verify"))
            elif report.ok:
                checks.append(Check(group, "integrity", PASS, f"verify_storage_integrity: {model_id} ok (every chunk "
                                    "checked)", True))
            else:
                checks.append(Check(group, "integrity", FAIL, " ".join(str(report).split())[:300], False))
    finally:
        cleanup = getattr(model, "cleanup_tensorstream", None)
        if cleanup is not None:
            try:
                cleanup()
            except Exception as error:  # noqa: BLE001
                checks.append(Check(group, "cleanup", FAIL, f"model.cleanup_tensorstream() failed: "
                                    f"{_one_line(error)}"))
        if model_id and model_id not in before:
            try:
                Storage(path).remove(model_id)
            except Exception:  # noqa: BLE001 - leaves a test model; cleanup is not what is being validated
                pass
    elapsed = time.perf_counter() - start
    checks.append(Check(group, "time", INFO, f"model checks took {elapsed:.1f} s", round(elapsed, 2)))
    return checks


# ---- the suite ---------------------------------------------------------------------------------------------------


def default_storage_path() -> Optional[str]:
    """TENSORSTREAM_STORAGE_PATH, or None (the suite then uses a temporary directory)."""
    return os.environ.get("TENSORSTREAM_STORAGE_PATH") or None


def run_validation(storage_path: Optional[str] = None, *, read_test_bytes: int = READ_TEST_BYTES,
                   model_check: bool = True) -> List[Check]:
    """Runs every check and returns them in table order (see the module docstring).

    ``storage_path`` defaults to TENSORSTREAM_STORAGE_PATH; without either the storage checks run in a
    temporary directory under /var/tmp (or the system's temporary directory) that is removed afterwards.
    """
    checks = check_environment()
    temporary = None
    if storage_path is None:
        storage_path = default_storage_path()
    if storage_path is None:
        base = "/var/tmp" if os.path.isdir("/var/tmp") and os.access("/var/tmp", os.W_OK) else None
        temporary = tempfile.mkdtemp(prefix="tensorstream-validate-", dir=base)
        storage_path = temporary
        checks.append(Check("storage", "location", INFO, f"no --storage and no TENSORSTREAM_STORAGE_PATH: "
                            f"checking a temporary directory {temporary}"))
    try:
        storage_checks, usable = check_storage(os.fspath(storage_path), read_test_bytes)
        checks.extend(storage_checks)
        environment_ok = not any(c.failed for c in checks if c.group == "environment")
        if not model_check:
            pass
        elif usable and environment_ok:
            checks.extend(check_model(os.fspath(storage_path)))
        else:
            why = "the storage path is unusable" if not usable else "the environment checks failed"
            checks.append(Check("model", "end to end", INFO, f"skipped: {why} (see above)"))
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    return checks


def format_table(checks: Sequence[Check]) -> str:
    header = ["status", "group", "check", "detail"]
    rows = [[c.status, c.group, c.name, c.detail] for c in checks]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(3)]

    def line(row: List[str]) -> str:
        return "  ".join([row[i].ljust(widths[i]) for i in range(3)] + [row[3]]).rstrip()

    fails = sum(c.failed for c in checks)
    summary = (f"{len(checks)} checks: {sum(c.status == PASS for c in checks)} PASS, {fails} FAIL, "
               f"{sum(c.status == INFO for c in checks)} INFO")
    summary += " - validation FAILED" if fails else " - validation passed"
    return "\n".join([line(header), line(["-" * w for w in widths[:3]] + ["-" * 6])] + [line(r) for r in rows]
                     + ["", summary])


__all__ = ["Check", "run_validation", "format_table", "passed", "check_environment", "check_storage", "check_model",
           "PASS", "FAIL", "INFO"]
