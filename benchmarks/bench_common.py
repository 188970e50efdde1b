"""What every benchmark in this folder shares: the machine description that goes into each JSON result, where to
put scratch files (never a memory file system), and the page-cache controls (mincore, evict, warm up).

Imported by the benchmark scripts as a sibling module (`python3 benchmarks/<name>.py` puts this folder on sys.path).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
GB = 1e9  # throughput is reported in decimal GB/s, as fio and dd do
MEMORY_FILE_SYSTEMS = {"tmpfs", "ramfs", "devtmpfs", "overlay-tmpfs"}


# ---- machine and file system -------------------------------------------------------------------------------------

def mount_of(path: Path) -> dict:
    """The /proc/mounts entry holding `path` (longest mount point that is a prefix of it)."""
    path = Path(os.path.realpath(path))
    best = {"mount_point": "/", "fstype": "?", "source": "?", "options": ""}
    best_len = -1
    with open("/proc/mounts") as f:
        for line in f:
            source, point, fstype, options = line.split()[:4]
            point = point.replace("\\040", " ")
            if (path == Path(point) or Path(point) in path.parents) and len(point) > best_len:
                best, best_len = {"mount_point": point, "fstype": fstype, "source": source, "options": options}, len(point)
    return best


def default_base_dir() -> Path:
    """/var/tmp, else the repo's build directory, else /tmp: the first that is not a memory file system (a storage
    benchmark on tmpfs measures memcpy, not storage)."""
    for candidate in (Path("/var/tmp"), REPO / "build", Path(tempfile.gettempdir())):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK) and mount_of(candidate)["fstype"] not in MEMORY_FILE_SYSTEMS:
            return candidate
    sys.exit("no disk-backed directory found (/var/tmp, build/, /tmp are all memory file systems); pass --dir")


def read_first(path: str, prefix: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def machine_description(bench_dir: Path) -> dict:
    """The fields every result file carries; each benchmark adds its own (tool versions, io_uring, ...)."""
    import torch

    mem_kib = read_first("/proc/meminfo", "MemTotal")
    mount = mount_of(bench_dir)
    usage = shutil.disk_usage(bench_dir)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "hostname": socket.gethostname(),
        "cpu_model": read_first("/proc/cpuinfo", "model name"),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(int(mem_kib.split()[0]) / (1 << 20), 1) if mem_kib != "?" else None,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tensorstream_revision": git_revision(),
        "load_average_at_start": load,
        "bench_dir": str(bench_dir),
        "filesystem": mount["fstype"],
        "filesystem_source": mount["source"],
        "filesystem_mount_point": mount["mount_point"],
        "filesystem_options": mount["options"],
        "filesystem_free_gib": round(usage.free / GIB, 1),
    }


# ---- page cache --------------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def residency(path: Path) -> float:
    """Fraction of the file's pages in the page cache (mincore over a read-only shared mapping: touches nothing)."""
    import numpy

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 1.0
        base = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if base in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {path} for mincore failed")
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(base, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            resident = int((numpy.frombuffer(vec, dtype=numpy.uint8) & 1).sum())
        finally:
            _libc.munmap(base, size)
        return resident / pages
    finally:
        os.close(fd)


def evict(path: Path, tries: int = 3, max_left: float = 0.001) -> float:
    """Drops the file from the page cache (sync, then POSIX_FADV_DONTNEED) until at most `max_left` of it is cached
    or `tries` run out; returns the residency left (pages mapped by a live process cannot be dropped)."""
    left = 1.0
    for _ in range(tries):
        os.sync()
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        left = residency(path)
        if left <= max_left:
            break
        time.sleep(0.2)
    return left


def warm_up(path: Path, tries: int = 3, block: int = 4 * MIB) -> float:
    """Reads the whole file through the page cache until it is all there; returns the residency reached."""
    reached = residency(path)
    for _ in range(tries):
        if reached >= 0.999:
            break
        with open(path, "rb", buffering=0) as f:
            while f.read(block):
                pass
        reached = residency(path)
    return reached


# ---- the summary every suite reports -----------------------------------------------------------------------------

def summary_row(suite: str, metric: str, arm: str, value: float, unit: str, *, baseline: str = None,
                baseline_value: float = None, target: float = None, higher_is_better: bool = True,
                note: str = "") -> dict:
    """One line of the `make bench` table (benchmarks/run_all.py): `arm` measured `value` (a median over rounds);
    `ratio` = value / baseline_value when there is a baseline; `met` says whether the ratio reaches `target`
    (>= when higher is better, <= otherwise), None when there is no target. Every suite's JSON carries a list of
    these under "summary", so the runner can build one table and one plot from all of them."""
    ratio = value / baseline_value if baseline_value else None
    met = None
    if target is not None and ratio is not None:
        met = ratio >= target if higher_is_better else ratio <= target
    return {"suite": suite, "metric": metric, "arm": arm, "value": value, "unit": unit, "baseline": baseline,
            "baseline_value": baseline_value, "ratio": ratio, "target": target,
            "higher_is_better": higher_is_better, "met": met, "note": note}
