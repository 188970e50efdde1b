#!/usr/bin/env python3
"""Engine read throughput, cold (S1) and warm (S2), against plain tools reading the same file.

DESIGN.md §8; see benchmarks/README.md. Every arm reads every byte of one store's data file (--size-gib of bf16
weights, blocks of ~64 MiB, chunks of 4 MiB, uncompressed). The engine arms acquire, wait for and release every
block in order, with a 512 MiB arena (2 MiB aligned, MADV_HUGEPAGE, as tensorstream.offload allocates it), prefetch
"adaptive" and checksums on.

S1. Cold (page cache evicted with posix_fadvise(DONTNEED) and checked with mincore before each arm): the engine
    with backend io_uring, pread, mmap and auto (direct_io auto) against `fio --rw=read --bs=4M --direct=1
    --iodepth=32` and against `dd bs=4M iflag=direct` (O_DIRECT) on the same file. Target per backend and
    baseline: >= 0.9.
S2. Warm (the file fully in the page cache, checked with mincore before each arm): the engine with backend auto,
    io_uring, pread and mmap against two threads doing buffered 4 MiB preads of the file into the same arena, and
    against two threads memcpy-ing the same number of bytes from anonymous memory into it. Target: >= 0.9.
Plus CPU seconds (user + sys) per GB for every arm. --extra-arms adds diagnostic arms (checksums off,
next_layer prefetch, a 4 KiB-page arena, warm direct_io=on) that have no S1/S2 target.

Arms are interleaved, the order rotating by one each round; at least 3 rounds (5 while the time budget allows),
medians. It prints a table and writes JSON (benchmarks/results/engine_read-<date>-<hostname>.json, or --json) with
the machine description and a "summary" list of bench_common.summary_row dicts, which `make bench` collects
(benchmarks/run_all.py). It is not a test: it never fails on a timing.

    make bench                                  # runs this as S1/S2
    python3 benchmarks/engine_read.py --dir /mnt/nvme/scratch --size-gib 8 --rounds 7
    python3 benchmarks/engine_read.py --smoke --json /tmp/er.json    # a few seconds, tiny store, 1 round
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import fcntl
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import bench_common as common
from bench_common import GB, GIB, KIB, MEMORY_FILE_SYSTEMS, MIB, REPO, RESULTS, evict, mount_of, residency, warm_up

STORE_MARK = "engine_read"  # metadata "benchmark" of the stores this script writes (and may replace)

try:
    import torch
except ImportError:  # pragma: no cover - the benchmark needs torch for its weights and arena
    sys.exit("engine_read.py needs torch (pip install torch)")

if str(REPO / "python") not in sys.path:
    sys.path.insert(0, str(REPO / "python"))
try:
    from tensorstream import _core
except ImportError as error:  # pragma: no cover
    sys.exit(f"cannot import tensorstream._core ({error}); build it first: make build")


# ---- machine and file system -------------------------------------------------------------------------------------

def tool_version(command: list) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def block_device_of(source: str) -> dict:
    """Queue settings of the block device behind a mount source (/dev/vda1 -> /sys/block/vda), when there is one."""
    name = os.path.basename(os.path.realpath(source)) if source.startswith("/dev/") else ""
    out = {}
    for candidate in (name, re.sub(r"p?\d+$", "", name)):
        queue = Path("/sys/block") / candidate / "queue"
        if candidate and queue.is_dir():
            for key in ("rotational", "nr_requests", "max_sectors_kb", "scheduler", "logical_block_size"):
                try:
                    out[key] = (queue / key).read_text().strip()
                except OSError:
                    pass
            out["device"] = candidate
            break
    return out


def disk_stat_path(source: str):
    """/sys/class/block/<dev>/stat of a mount source such as /dev/vda or /dev/nvme0n1p2 (None if there is none)."""
    if not source.startswith("/dev/"):
        return None
    path = Path("/sys/class/block") / os.path.basename(os.path.realpath(source)) / "stat"
    return path if path.is_file() else None


def disk_reads(stat_path):
    """(read requests completed, sectors read) of the device, or None."""
    if stat_path is None:
        return None
    try:
        fields = stat_path.read_text().split()
        return int(fields[0]), int(fields[2])
    except (OSError, ValueError, IndexError):
        return None


def thp_setting() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        match = re.search(r"\[(\w+)\]", text)
        return match.group(1) if match else text.strip()
    except OSError:
        return "?"


def machine_description(bench_dir: Path) -> dict:
    uring, uring_reason = _core.io_uring_available()
    return {**common.machine_description(bench_dir), "io_uring_available": bool(uring),
            "io_uring_unavailable_reason": uring_reason, "fio": tool_version(["fio", "--version"]),
            "dd": tool_version(["dd", "--version"]), "block_device": block_device_of(common.mount_of(bench_dir)["source"]),
            "transparent_hugepage": thp_setting()}


# ---- page cache --------------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


# ---- the store ---------------------------------------------------------------------------------------------------

def block_layout(block_bytes: int) -> list:
    """(name, offset, numel) of a block's bf16 tensors: 1/4, 1/4, 1/2 of it, like a layer's projections."""
    numel = block_bytes // 2
    quarter = numel // 4
    return [("q_proj", 0, quarter), ("k_proj", quarter, quarter), ("mlp", 2 * quarter, numel - 2 * quarter)]


def store_is_valid(storage, model_id: str, nblocks: int, block_bytes: int, chunk_size: int, seed: int) -> str:
    """'' when the published model is one this script wrote with these parameters, else why not."""
    if not storage.has_model(model_id):
        return "absent"
    try:
        reader = _core.StoreReader.open(storage, model_id)  # strict manifest parse and data-file size check
        blocks = reader.blocks()
        meta = dict(reader.metadata)
        data_size = os.stat(reader.data_path).st_size
        chunk = reader.chunk_size
    except Exception as error:  # noqa: BLE001 - any failure means "rewrite it"
        return f"unreadable ({error})"
    want = {"benchmark": STORE_MARK, "seed": str(seed), "block_bytes": str(block_bytes)}
    if any(meta.get(k) != v for k, v in want.items()):
        return f"metadata {meta} != {want}"
    if len(blocks) != nblocks or chunk != chunk_size:
        return f"{len(blocks)} blocks of chunk {chunk}, want {nblocks} of chunk {chunk_size}"
    if not all(b["all_raw"] for b in blocks):
        return "compressed blocks"
    if data_size < nblocks * block_bytes:
        return f"data file of {data_size} bytes, want at least {nblocks * block_bytes}"
    return ""


def write_store(storage, model_id: str, nblocks: int, block_bytes: int, chunk_size: int, seed: int) -> dict:
    """Writes the store block by block: one block of bf16 randn weights is in memory at a time."""
    layout = block_layout(block_bytes)
    metadata = {"benchmark": STORE_MARK, "seed": str(seed), "block_bytes": str(block_bytes)}
    writer = _core.StoreWriter(storage, model_id, chunk_size=chunk_size, compression_level=0, replace=True,
                               metadata=metadata)
    gen = torch.Generator().manual_seed(seed)
    try:
        for b in range(nblocks):
            block = torch.randn(block_bytes // 2, generator=gen, dtype=torch.bfloat16)
            writer.begin_block(f"layers.{b}")
            base = block.data_ptr()
            for name, offset, numel in layout:
                writer.add_tensor(f"layers.{b}.{name}", "bfloat16", [numel], base + 2 * offset, 2 * numel)
            del block
            if (b + 1) % 16 == 0 or b + 1 == nblocks:
                print(f"    {b + 1}/{nblocks} blocks written", flush=True)
        return writer.commit()
    finally:
        del writer


# ---- arms --------------------------------------------------------------------------------------------------------

def cpu_self() -> float:
    r = os.times()
    return r.user + r.system


def cpu_children() -> float:
    r = os.times()
    return r.children_user + r.children_system


MADV_HUGEPAGE = 14


class Arena:
    """A 4 KiB aligned uint8 tensor (what O_DIRECT needs), pre-faulted so no arm pays for first-touch faults.

    With huge=True it is 2 MiB aligned and advised MADV_HUGEPAGE before the pre-faulting, so (where transparent
    huge pages are "madvise" or "always") it is backed by 2 MiB pages: a 4 MiB O_DIRECT read into it then needs
    2 physically contiguous segments instead of up to 1024 scattered 4 KiB ones."""

    def __init__(self, nbytes: int, huge: bool = False) -> None:
        align = 2 * MIB if huge else 4096
        self._raw = torch.empty(nbytes + align, dtype=torch.uint8)
        offset = (-self._raw.data_ptr()) % align
        self.tensor = self._raw[offset:offset + nbytes]
        self.huge = False
        if huge:
            self.huge = _libc.madvise(ctypes.c_void_p(self.tensor.data_ptr()), ctypes.c_size_t(nbytes),
                                      MADV_HUGEPAGE) == 0
        self.tensor.fill_(0)
        self.address = self.tensor.data_ptr()
        self.nbytes = nbytes
        self.view = memoryview((ctypes.c_uint8 * nbytes).from_address(self.address)).cast("B")


STAT_KEYS = ("bytes_read", "bytes_delivered", "acquires", "hits", "misses", "prefetch_hits", "prefetches_issued",
             "evictions", "checksum_failures", "io_errors", "wait_ns", "io_busy_ns", "io_throughput_bytes_per_s")


def engine_arm(storage, model_id: str, nblocks: int, arena: Arena, options: dict) -> dict:
    engine = _core.Engine(storage, model_id, arena.address, arena.nbytes, **options)
    backend = engine.backend_name
    fallback = engine.backend_fallback_reason
    try:
        mapped = 0
        arena_end = arena.address + arena.nbytes
        c0 = cpu_self()
        t0 = time.perf_counter()
        for b in range(nblocks):
            ticket = engine.acquire(b)
            ticket.wait()
            # A block outside the arena is a zero-copy view of the file (mmap backend, or AUTO on cached data).
            mapped += not arena.address <= ticket.address < arena_end
            engine.release(b)
        seconds = time.perf_counter() - t0
        stats = engine.stats()
    finally:
        t1 = time.perf_counter()
        engine.close()
        close_seconds = time.perf_counter() - t1
    cpu = cpu_self() - c0
    # Mapped blocks are views of the file, faulted in by verification; builds that leave them out of bytes_read
    # still count them in bytes_delivered (what reached the caller).
    nbytes = stats["bytes_read"] if stats["bytes_read"] else stats["bytes_delivered"]
    out = {"seconds": seconds, "bytes": nbytes, "cpu_s": cpu, "close_s": close_seconds,
           "backend": backend, "blocks_mapped": mapped, "stats": {k: stats[k] for k in STAT_KEYS}}
    if fallback:
        out["backend_fallback_reason"] = fallback
    load_ns = sorted(b["load_ns"] for b in stats["blocks"] if b["loads"])
    if load_ns:
        out["block_load_ms_median"] = load_ns[len(load_ns) // 2] / 1e6
    out["io_busy_fraction"] = stats["io_busy_ns"] / 1e9 / seconds
    out["wait_fraction"] = stats["wait_ns"] / 1e9 / seconds
    return out


def fio_arm(path: Path, ioengine: str, iodepth: int, block: int, jobs: int = 1) -> dict:
    """fio reading the whole file once with O_DIRECT; with jobs > 1 each job reads its own 1/jobs of the file
    (offset_increment), all at once, reported as one group."""
    command = ["fio", "--name=seqread", f"--filename={path}", "--readonly", "--rw=read", f"--bs={block}",
               "--direct=1", f"--ioengine={ioengine}", f"--iodepth={iodepth}", f"--numjobs={jobs}",
               "--output-format=json"]
    if jobs > 1:
        share = path.stat().st_size // jobs // block * block
        command += [f"--size={share}", f"--offset_increment={share}", "--group_reporting"]
    c0 = cpu_children()
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu_rusage = cpu_children() - c0
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    job = report["jobs"][0]
    read = job["read"]
    runtime_s = read["runtime"] / 1000.0  # ms
    cpu_fio = (job["usr_cpu"] + job["sys_cpu"]) / 100.0 * runtime_s
    return {"seconds": runtime_s, "bytes": read["io_bytes"], "cpu_s": cpu_fio, "cpu_s_rusage": cpu_rusage,
            "wall_s": wall, "fio_bw_bytes": read["bw_bytes"], "usr_cpu_pct": job["usr_cpu"],
            "sys_cpu_pct": job["sys_cpu"], "command": " ".join(command)}


def dd_arm(path: Path, block: int) -> dict:
    command = ["dd", f"if={path}", "of=/dev/null", f"bs={block}", "iflag=direct"]
    c0 = cpu_children()
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu = cpu_children() - c0
    if proc.returncode != 0:
        raise RuntimeError(f"dd failed: {proc.stderr.strip()}")
    summary = proc.stderr.strip().splitlines()[-1]
    match = re.match(r"(\d+) bytes .* copied, ([0-9.e+-]+) s", summary)
    nbytes = int(match.group(1)) if match else os.stat(path).st_size
    seconds = float(match.group(2)) if match else wall
    return {"seconds": seconds, "bytes": nbytes, "cpu_s": cpu, "wall_s": wall, "dd_says": summary,
            "command": " ".join(command)}


def pread_arm(path: Path, arena: Arena, threads: int, block: int, direct: bool = False) -> dict:
    """`threads` Python threads, each reading every `threads`-th 4 MiB piece of the file with a buffered preadv
    into the arena (the piece's place cycles through the arena, as the engine's slots do). preadv releases the
    GIL; at 4 MiB per call the interpreter's share is negligible.

    direct=True opens with O_DIRECT: `threads` reads in flight into the huge-page arena, which is the engine's own
    advantage over fio and dd (their buffers are 4 KiB pages, so a 4 MiB read reaches the device as many small
    segments): the cold baseline that reads the way the engine does, without any of its work."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
    size = os.fstat(fd).st_size
    pieces = (size + block - 1) // block
    slots = arena.nbytes // block
    done = [0] * threads
    errors: list = []

    def reader(t: int) -> None:
        try:
            for i in range(t, pieces, threads):
                length = min(block, size - i * block)
                if direct:  # whole 4 KiB units; the read stops at the end of the file
                    length = (length + 4095) // 4096 * 4096
                start = (i % slots) * block
                got = 0
                while got < length:
                    n = os.preadv(fd, [arena.view[start + got:start + length]], i * block + got)
                    if n == 0 and i * block + got >= size:
                        break
                    if n <= 0:
                        raise OSError(f"short read at {i * block + got}")
                    got += n
                done[t] += got
        except BaseException as error:  # noqa: BLE001 - reported after join
            errors.append(error)

    try:
        workers = [threading.Thread(target=reader, args=(t,)) for t in range(threads)]
        c0 = cpu_self()
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        seconds = time.perf_counter() - t0
        cpu = cpu_self() - c0
    finally:
        os.close(fd)
    if errors:
        raise errors[0]
    return {"seconds": seconds, "bytes": sum(done), "cpu_s": cpu}


_libc.memcpy.restype = ctypes.c_void_p
_libc.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def memcpy_arm(source: Arena, arena: Arena, threads: int, block: int) -> dict:
    """The memory-to-memory ceiling of a warm read: `threads` Python threads, each copying every `threads`-th
    4 MiB piece of `source` (anonymous memory as large as the data file, pre-faulted) into the arena with libc
    memcpy, the piece's place cycling through the arena exactly as in pread_arm. A ctypes call releases the GIL,
    so the threads copy in parallel; at 4 MiB per call the interpreter's share is negligible."""
    base = source.address
    size = source.nbytes
    pieces = (size + block - 1) // block
    slots = arena.nbytes // block
    done = [0] * threads

    def copier(t: int) -> None:
        for i in range(t, pieces, threads):
            length = min(block, size - i * block)
            _libc.memcpy(arena.address + (i % slots) * block, base + i * block, length)
            done[t] += length

    workers = [threading.Thread(target=copier, args=(t,)) for t in range(threads)]
    c0 = cpu_self()
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - t0
    cpu = cpu_self() - c0
    if sum(done) != size:
        raise RuntimeError(f"memcpy arm copied {sum(done)} of {size} bytes")
    return {"seconds": seconds, "bytes": size, "cpu_s": cpu}


def tool_unavailable(name: str, path: Path, fio_engine: str) -> str:
    """'' when the plain tool runs here with O_DIRECT on `path` (a 4 MiB trial read), else why not: the arm is then
    left out (a missing fio, or a file system without O_DIRECT such as tmpfs), and so are its summary rows."""
    if shutil.which(name) is None:
        return f"{name} not found"
    if name == "fio":
        command = ["fio", "--name=probe", f"--filename={path}", "--readonly", "--rw=read", "--bs=4096", "--size=4M",
                   "--direct=1", f"--ioengine={fio_engine}", "--iodepth=1", "--output-format=json"]
    else:
        command = ["dd", f"if={path}", "of=/dev/null", "bs=4096", "count=1024", "iflag=direct"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        return f"{name} failed to run ({error})"
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        return f"{name} with O_DIRECT failed: {lines[-1] if lines else proc.returncode}"
    return ""


# ---- rounds ------------------------------------------------------------------------------------------------------

def run_rounds(title: str, arms: list, prepare, rounds_wanted: int, min_rounds: int, budget_s: float,
               expected_bytes: int, data_path: Path, stat_path) -> list:
    """Runs the arms interleaved (A B C … A B C …). `prepare` puts the page cache in the section's state before
    each arm and returns the residency it checked. Stops adding rounds past `min_rounds` when another would end
    after `budget_s`."""
    started = time.monotonic()
    rounds = []
    for r in range(rounds_wanted):
        round_start = time.monotonic()
        results = {}
        # The order rotates by one arm per round (A B C, B C A, C A B, ...): no arm always runs first, or always
        # right after the same neighbour.
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for name, fn in order:
            before = prepare()
            disk0 = disk_reads(stat_path)
            result = fn()
            disk1 = disk_reads(stat_path)
            if disk0 is not None and disk1 is not None:
                # Whole-device counts: anything else reading the disk meanwhile shows up here too.
                result["device_read_requests"] = disk1[0] - disk0[0]
                result["device_read_bytes"] = (disk1[1] - disk0[1]) * 512
            result["residency_before"] = before
            result["residency_after"] = residency(data_path)
            result["gb_s"] = result["bytes"] / result["seconds"] / GB
            result["cpu_s_per_gb"] = result["cpu_s"] / (result["bytes"] / GB)
            if result["bytes"] < expected_bytes:
                print(f"  warning: {name} read {result['bytes']} bytes of {expected_bytes}", file=sys.stderr)
            results[name] = result
        results["order"] = [name for name, _ in order]
        rounds.append(results)
        print(f"  {title} round {r + 1}: " + ", ".join(f"{n} {results[n]['gb_s']:.2f}" for n, _ in arms)
              + " GB/s", flush=True)
        round_seconds = time.monotonic() - round_start
        if (r + 1 >= min_rounds and r + 1 < rounds_wanted
                and time.monotonic() - started + round_seconds > budget_s):
            print(f"  ({title}: stopping after {r + 1} rounds: another would pass the {budget_s:.0f} s budget)")
            break
    return rounds


def summarize(rounds: list, name: str) -> dict:
    values = [x[name]["gb_s"] for x in rounds]
    cpu = [x[name]["cpu_s_per_gb"] for x in rounds]
    out = {"gb_s_median": statistics.median(values), "gb_s_min": min(values), "gb_s_max": max(values),
           "cpu_s_per_gb_median": statistics.median(cpu)}
    for key in ("io_busy_fraction", "wait_fraction"):
        if key in rounds[0][name]:
            out[key + "_median"] = statistics.median(x[name][key] for x in rounds)
    out["blocks_mapped_max"] = max(x[name].get("blocks_mapped", 0) for x in rounds)
    # Average device read request, over the arms whose bytes came mostly from the device (not the page cache).
    sizes = [x[name]["device_read_bytes"] / x[name]["device_read_requests"] for x in rounds
             if x[name].get("device_read_requests") and x[name]["device_read_bytes"] >= 0.5 * x[name]["bytes"]]
    if sizes:
        out["device_request_bytes_median"] = statistics.median(sizes)
    return out


def ratio(rounds: list, summary: dict, arm: str, base: str, target: float) -> dict:
    return {"arm": arm, "baseline": base, "target": target,
            "ratio_of_medians": summary[arm]["gb_s_median"] / summary[base]["gb_s_median"],
            "median_of_round_ratios": statistics.median(x[arm]["gb_s"] / x[base]["gb_s"] for x in rounds)}


# ---- main --------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/var/tmp/tensorstream-bench"),
                   help="storage directory of the benchmark store (created once, reused while valid; never a tmpfs)")
    p.add_argument("--size-gib", type=float, default=4.0, help="size of the store (at least 4 GiB for the targets)")
    p.add_argument("--block-mib", type=int, default=64, help="bytes per block (a layer: three bf16 tensors)")
    p.add_argument("--chunk-mib", type=int, default=4, help="store chunk size (unit of checksums and reads)")
    p.add_argument("--arena-mib", type=int, default=512, help="engine arena (uint8 tensor, 2 MiB aligned)")
    p.add_argument("--io-threads", type=int, default=4, help="engine num_io_threads")
    p.add_argument("--queue-depth", type=int, default=32, help="engine queue_depth and fio --iodepth")
    p.add_argument("--baseline-threads", type=int, default=2, help="threads of the warm pread and memcpy baselines")
    p.add_argument("--memory-pressure", default="balanced", choices=("conservative", "balanced", "aggressive"))
    p.add_argument("--prefetch", default="adaptive", choices=("none", "next_layer", "adaptive"),
                   help="prefetch_strategy of the engine arms (the extra next_layer arms always use next_layer)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds wanted per section")
    p.add_argument("--min-rounds", type=int, default=3, help="rounds always run, whatever the budget")
    p.add_argument("--cold-budget-s", type=float, default=150.0,
                   help="cold rounds beyond --min-rounds are only started while they fit in this")
    p.add_argument("--warm-budget-s", type=float, default=40.0, help="the same for the warm rounds")
    p.add_argument("--time-budget-s", type=float, default=210.0,
                   help="the whole run, writing the store included: the cold budget shrinks to what is left of it "
                        "after writing the store and keeping --warm-budget-s for the warm rounds")
    p.add_argument("--extra-arms", action="store_true",
                   help="add the diagnostic arms: checksums off, next_layer, 4 KiB-page arena (cold), direct_io=on "
                        "(warm); they report no S1/S2 summary row except warm auto / direct_io=on (target 1.3)")
    p.add_argument("--skip-cold", action="store_true", help="skip the cold section (S1)")
    p.add_argument("--skip-warm", action="store_true", help="skip the warm section (S2)")
    p.add_argument("--remove-store", action="store_true", help="delete the store at the end (default: keep it)")
    p.add_argument("--smoke", action="store_true",
                   help="a few seconds: a 64 MiB store of 16 MiB blocks, 64 MiB arena, 1 round, store removed at "
                        "the end (checks that the script runs, not a measurement)")
    p.add_argument("--json", type=Path, default=None, help="where to write the results (default: benchmarks/results/)")
    args = p.parse_args(argv)
    if args.smoke:
        args.size_gib, args.block_mib, args.arena_mib = 1 / 16, 16, 64
        args.rounds = args.min_rounds = 1
        args.remove_store = True

    base = args.dir
    base.mkdir(parents=True, exist_ok=True)
    # Two runs on one store would evict and warm each other's page cache mid-arm: the second one waits.
    lock = open(base / ".engine_read.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"engine_read: another run holds {base / '.engine_read.lock'}; waiting for it", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    started = time.monotonic()
    fstype = mount_of(base)["fstype"]
    if fstype in MEMORY_FILE_SYSTEMS:
        print(f"warning: {base} is on {fstype}: cold reads there measure memory, not storage", file=sys.stderr)
    if Path(os.path.realpath(base)).is_relative_to(REPO):
        print(f"warning: {base} is inside the repository; the store is {args.size_gib} GiB", file=sys.stderr)
    block_bytes = args.block_mib * MIB
    chunk_size = args.chunk_mib * MIB
    nblocks = max(1, round(args.size_gib * GIB / block_bytes))
    total = nblocks * block_bytes
    seed = 0
    model_id = f"engine-read-{nblocks}x{args.block_mib}m-c{args.chunk_mib}m"
    block = 4 * MIB  # the tools' read size, the same as the engine's chunk reads by default

    storage = _core.StorageDirectory.open_or_create(str(base))
    why = store_is_valid(storage, model_id, nblocks, block_bytes, chunk_size, seed)
    store_seconds = None
    if why:
        need = total + 256 * MIB
        free = shutil.disk_usage(base).free
        if free < need:
            print(f"error: {base} has {free / GIB:.1f} GiB free, the store needs {need / GIB:.1f} GiB", file=sys.stderr)
            return 2
        print(f"engine_read: writing store {model_id} in {base} ({total / GIB:.2f} GiB; store {why})", flush=True)
        t0 = time.perf_counter()
        write_store(storage, model_id, nblocks, block_bytes, chunk_size, seed)
        store_seconds = time.perf_counter() - t0
        os.sync()
    reader = _core.StoreReader.open(storage, model_id)
    data_path = Path(reader.data_path)
    data_size = os.stat(data_path).st_size
    del reader

    machine = machine_description(base)
    uring = machine["io_uring_available"]
    fio_engine = "io_uring" if uring else "libaio"
    print(f"engine_read: {data_size / GIB:.2f} GiB store {model_id} ({nblocks} blocks of {args.block_mib} MiB, chunk "
          f"{args.chunk_mib} MiB) at {data_path} ({machine['filesystem']} on {machine['filesystem_source']}); "
          f"{machine['cpu_model']}, {machine['cpu_cores']} cores, {machine['ram_gib']} GiB RAM, kernel "
          f"{machine['kernel']}, io_uring {'yes' if uring else 'no: ' + machine['io_uring_unavailable_reason']}, "
          f"load {machine['load_average_at_start']}", flush=True)
    skipped = {name: why for name in ("fio", "dd") if (why := tool_unavailable(name, data_path, fio_engine))}
    for name, why in skipped.items():
        print(f"  note: the {name} arm is left out: {why}", file=sys.stderr)

    # Engine arms and baselines use the arena tensorstream.offload allocates (python/tensorstream/torch/arena.py:
    # 2 MiB aligned, MADV_HUGEPAGE). With --extra-arms one cold arm repeats io_uring on a plain 4 KiB-page arena.
    product_arena = Arena(args.arena_mib * MIB, huge=True)
    small_arena = Arena(args.arena_mib * MIB) if args.extra_arms else None
    stat_path = disk_stat_path(machine["filesystem_source"])
    engine_options = dict(num_io_threads=args.io_threads, queue_depth=args.queue_depth,
                          prefetch_strategy=args.prefetch, memory_pressure_mode=args.memory_pressure)

    def engine(backend: str, direct_io: str, checksums: bool, prefetch: str = args.prefetch, on=None):
        options = dict(engine_options, backend=backend, direct_io=direct_io, verify_checksums=checksums,
                       prefetch_strategy=prefetch)
        target = product_arena if on is None else on
        return lambda: engine_arm(storage, model_id, nblocks, target, options)

    # Each engine arm is a fresh engine making one pass, so "adaptive" is in its learning pass: it guesses storage
    # order until it has seen transitions (cpp/src/residency/prefetcher.cpp). The extra next_layer arm prefetches by
    # index from the first access: the difference is what prefetching buys a single pass.
    # The mmap backend is only run with checksums on: verification is what touches (reads) its pages; without
    # it the arm would read nothing. Warm, backend auto (direct_io auto) and mmap deliver blocks as views of the
    # page cache; io_uring and pread copy them into the arena with buffered reads.
    # The 4 KiB arena arm: an O_DIRECT read is split by the device's segment limit (max_segments, often 128 or 254
    # entries), so into 4 KiB pages a 4 MiB read may become several device requests, into 2 MiB pages one. The
    # "req KiB" column shows the average device request of each arm.
    backends = ("io_uring", "pread", "mmap", "auto")
    # Cold: the copying backends with O_DIRECT forced (AUTO fills the page cache when memory can hold the store,
    # which a 4 GiB store on this machine is: "engine auto" measures that path, the others the direct one).
    cold_arms = [(f"engine {b}", engine(b, "auto" if b in ("auto", "mmap") else "on", True)) for b in backends]
    if args.extra_arms:
        cold_arms += [("engine auto, xxh3 off", engine("auto", "auto", False)),
                      ("engine auto, next_layer", engine("auto", "auto", True, "next_layer")),
                      ("engine io_uring, 4k arena", engine("io_uring", "auto", True, on=small_arena))]
    if "fio" not in skipped:
        cold_arms.append(("fio", lambda: fio_arm(data_path, fio_engine, args.queue_depth, block)))
        # fio at its best here (#16 item 6): several jobs in flight, larger requests.
        cold_arms.append(("fio x4", lambda: fio_arm(data_path, fio_engine, args.queue_depth, block, jobs=4)))
        cold_arms.append(("fio 16M", lambda: fio_arm(data_path, fio_engine, args.queue_depth, 4 * block)))
    cold_arms.append((f"direct x{2 * args.queue_depth // 4}",
                      lambda: pread_arm(data_path, product_arena, 2 * args.queue_depth // 4, block, direct=True)))
    if "dd" not in skipped:
        cold_arms.append(("dd", lambda: dd_arm(data_path, block)))
    memcpy_source = []  # allocated when the warm section starts
    threads = args.baseline_threads
    warm_arms = [(f"engine {b}", engine(b, "auto", True)) for b in ("auto", "io_uring", "pread", "mmap")]
    if args.extra_arms:
        warm_arms += [("engine auto, xxh3 off", engine("auto", "auto", False)),
                      ("engine pread, xxh3 off", engine("pread", "auto", False)),
                      ("engine auto, next_layer", engine("auto", "auto", True, "next_layer")),
                      ("engine direct_io=on", engine("auto", "on", True))]
    warm_arms += [(f"pread x{threads}", lambda: pread_arm(data_path, product_arena, threads, block)),
                  (f"memcpy x{threads}", lambda: memcpy_arm(memcpy_source[0], product_arena, threads, block))]
    labels = {
        "engine io_uring": f"engine io_uring qd{args.queue_depth}, xxh3 (cold: O_DIRECT)",
        "engine pread": f"engine pread x{args.io_threads}, xxh3 (cold: O_DIRECT)",
        "disk limit": "disk limit: best baseline of each round",
        "engine mmap": "engine mmap (zero-copy views), xxh3",
        "engine auto": "engine auto, xxh3",
        "engine auto, xxh3 off": "engine auto, no checksums",
        "engine pread, xxh3 off": f"engine pread x{args.io_threads}, no checksums",
        "engine auto, next_layer": "engine auto, xxh3, next_layer",
        "engine io_uring, 4k arena": "engine io_uring, xxh3, 4 KiB-page arena",
        "fio": f"fio {fio_engine} qd{args.queue_depth} bs=4M direct",
        "fio x4": f"fio {fio_engine} 4 jobs x qd{args.queue_depth} bs=4M direct",
        "fio 16M": f"fio {fio_engine} qd{args.queue_depth} bs=16M direct",
        f"direct x{2 * args.queue_depth // 4}": f"{2 * args.queue_depth // 4} threads, O_DIRECT pread 4 MiB, THP arena",
        "dd": "dd bs=4M iflag=direct",
        "engine direct_io=on": "engine auto, direct_io=on (forced), xxh3",
        f"pread x{threads}": f"{threads} threads, buffered pread 4 MiB",
        f"memcpy x{threads}": f"{threads} threads, memcpy 4 MiB from RAM",
    }

    def cold_prepare() -> float:
        left = evict(data_path)
        if left > 0.01:
            print(f"  warning: {left:.1%} of the file still cached after eviction", file=sys.stderr)
        return left

    def warm_prepare() -> float:
        reached = warm_up(data_path)
        if reached < 0.99:
            print(f"  warning: only {reached:.1%} of the file cached after warming", file=sys.stderr)
        return reached

    wanted = max(args.rounds, args.min_rounds)
    cold = warm = []
    budgets = {}
    if not args.skip_cold:
        # At most what is left of the whole budget after writing the store and setting up, less the warm share.
        left = args.time_budget_s - (time.monotonic() - started) - (0 if args.skip_warm else args.warm_budget_s)
        budgets["cold"] = max(0.0, min(args.cold_budget_s, left))
        cold = run_rounds("cold", cold_arms, cold_prepare, wanted, args.min_rounds, budgets["cold"], data_size,
                          data_path, stat_path)
    if not args.skip_warm:
        # The memcpy source: anonymous memory of the data file's size (the same size class as the page cache the
        # pread arm copies from, far beyond any CPU cache), pre-faulted so the arm pays no first-touch faults, and
        # advised for huge pages like the arena: the kernel reads the page cache through its huge-page direct
        # map, so a 4 KiB-page source would handicap the ceiling with TLB misses the pread arm does not have.
        memcpy_source.append(Arena(data_size, huge=True))
        budgets["warm"] = args.warm_budget_s
        warm = run_rounds("warm", warm_arms, warm_prepare, wanted, args.min_rounds, budgets["warm"], data_size,
                          data_path, stat_path)
        memcpy_source.clear()
    if args.remove_store:
        storage.remove_model(model_id)
    elapsed = time.monotonic() - started

    # ---- table ----
    header = (f"  {'arm':<44} {'GB/s':>6} {'min':>6} {'max':>6} {'CPU s/GB':>8} {'io busy':>7} {'wait':>5} "
              f"{'req KiB':>7}  ratio")
    lines = ["", f"Engine arms: a fresh engine per arm, one pass acquire/wait/release over all {nblocks} blocks; arena "
                 f"{product_arena.nbytes // MIB} MiB (2 MiB aligned, huge pages advised: "
                 f"{'yes' if product_arena.huge else 'no'}), prefetch {args.prefetch}, memory pressure "
                 f"{args.memory_pressure}, {args.io_threads} io threads, queue depth {args.queue_depth}; "
                 "xxh3 = chunk checksums verified."]
    sections = {}
    summary_rows = []
    size_note = f"{data_size / GIB:.2f} GiB"

    def section(key: str, title: str, rounds: list, arms: list, ratios: list) -> None:
        summary = {name: summarize(rounds, name) for name, _ in arms}
        by_arm = {}
        results = [ratio(rounds, summary, a, b, t) for a, b, t in ratios if a in summary and b in summary]
        for r in results:
            by_arm.setdefault(r["arm"], []).append(r)
        lines.extend(["", title, header])
        for name, _ in arms:
            s = summary[name]
            busy = f"{s['io_busy_fraction_median']:.0%}" if "io_busy_fraction_median" in s else ""
            wait = f"{s['wait_fraction_median']:.0%}" if "wait_fraction_median" in s else ""
            req = f"{s['device_request_bytes_median'] / KIB:.0f}" if "device_request_bytes_median" in s else ""
            rat = "; ".join(f"{x['ratio_of_medians']:.2f} of {x['baseline']}" for x in by_arm.get(name, []))
            label = labels[name] + (" *" if s["blocks_mapped_max"] else "")
            lines.append(f"  {label:<44} {s['gb_s_median']:>6.2f} {s['gb_s_min']:>6.2f} {s['gb_s_max']:>6.2f} "
                         f"{s['cpu_s_per_gb_median']:>8.3f} {busy:>7} {wait:>5} {req:>7}  {rat}")
        for r in results:
            if r["target"]:
                verdict = "meets" if r["ratio_of_medians"] >= r["target"] else "BELOW"
                lines.append(f"  target {r['arm']} / {r['baseline']} >= {r['target']:.2f}: {r['ratio_of_medians']:.3f} "
                             f"({verdict}; median of round ratios {r['median_of_round_ratios']:.3f})")
                metric = "S1 cold read" if key == "cold" else "S2 warm read"
                a, b = summary[r["arm"]], summary[r["baseline"]]
                note = f"{size_note}, {len(rounds)} rounds; median of round ratios {r['median_of_round_ratios']:.3f}"
                if a["blocks_mapped_max"]:
                    note += "; blocks are zero-copy views of the file mapping: the checksum pass reads every byte"
                if "device_request_bytes_median" in a and "device_request_bytes_median" in b:
                    note += (f"; device request {a['device_request_bytes_median'] / KIB:.0f} KiB vs "
                             f"{b['device_request_bytes_median'] / KIB:.0f} KiB")
                summary_rows.append(common.summary_row(
                    "engine_read", metric, r["arm"], a["gb_s_median"], "GB/s", baseline=r["baseline"],
                    baseline_value=b["gb_s_median"], target=r["target"], note=note))
        sections[key] = {"summary": summary, "ratios": results, "rounds": rounds, "budget_s": budgets[key]}

    if cold:
        # The disk's limit is the best plain reader of each round (#16 item 6): fio one job / four jobs / 16 MiB
        # requests, dd, and O_DIRECT reads into a huge-page buffer. Against a weak baseline the engine looked 2.3x
        # faster than the disk.
        baselines = [name for name, _ in cold_arms if not name.startswith("engine")]
        for x in cold:
            x["disk limit"] = dict(max((x[b] for b in baselines), key=lambda r: r["gb_s"]))
        section("cold", f"S1 cold read (evicted + mincore-checked before each arm): {size_note}, {len(cold)} "
                "interleaved rounds, medians",
                cold, cold_arms + [("disk limit", None)],
                [(f"engine {b}", "disk limit", 0.9) for b in backends]
                + [(f"engine {b}", base_arm, 0) for b in backends for base_arm in baselines]
                + [("engine auto, xxh3 off", "disk limit", 0), ("engine auto, next_layer", "disk limit", 0),
                   ("engine io_uring, 4k arena", "disk limit", 0)]
                + [(b, "disk limit", 0) for b in baselines])
    if warm:
        section("warm", f"S2 warm read (file in the page cache, mincore-checked before each arm): {size_note}, "
                f"{len(warm)} interleaved rounds, medians",
                warm, warm_arms,
                [(f"engine {b}", base_arm, 0.9) for b in ("auto", "io_uring", "pread", "mmap")
                 for base_arm in (f"pread x{threads}", f"memcpy x{threads}")]
                + [("engine auto, xxh3 off", f"pread x{threads}", 0),
                   ("engine pread, xxh3 off", f"pread x{threads}", 0),
                   ("engine auto, next_layer", f"pread x{threads}", 0),
                   ("engine auto", "engine direct_io=on", 1.3), ("engine direct_io=on", f"pread x{threads}", 0),
                   (f"pread x{threads}", f"memcpy x{threads}", 0)])
    for name, why in skipped.items():
        lines.append(f"  ({name} left out: {why})")
    if any(arm["blocks_mapped_max"] for sec in sections.values() for arm in sec["summary"].values()):
        lines.append("\n* blocks delivered as zero-copy views of the file (page cache), not copied into the arena: the "
                     "checksum pass is what reads their bytes; with checksums off no byte is read, so that figure "
                     "is the cost of mapping and prefaulting, not of reading.")
    lines.append(f"\n(GB = 1e9 bytes. io busy: share of the arm's time with engine reads in flight; wait: share the "
                 f"caller spent in Ticket.wait (mapped loads add their whole duration to io busy, so overlapping ones can "
                 f"pass 100 %); req KiB: average read request the device completed. {elapsed:.0f} s"
                 + (f", of which {store_seconds:.1f} s writing the store" if store_seconds else "")
                 + f"; {machine['filesystem']} at {data_path.parent})")
    print("\n".join(lines))

    now = _dt.datetime.now(_dt.timezone.utc)
    out_path = args.json or RESULTS / f"engine_read-{now:%Y%m%d-%H%M%S}-{socket.gethostname()}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "engine_read",
        "date_utc": now.isoformat(timespec="seconds"),
        "machine": machine,
        "parameters": {"model_id": model_id, "data_path": str(data_path), "data_bytes": data_size,
                       "blocks": nblocks, "block_bytes": block_bytes, "tensors_per_block": 3, "dtype": "bfloat16",
                       "chunk_size": chunk_size, "compression_level": 0, "checksums": "xxh3-64",
                       "arena_bytes": product_arena.nbytes, "engine": dict(engine_options),
                       "huge_arena_advised": product_arena.huge, "tool_block_bytes": block,
                       "baseline_threads": threads, "fio_ioengine": fio_engine, "rounds_wanted": wanted,
                       "min_rounds": args.min_rounds, "time_budget_s": args.time_budget_s,
                       "cold_budget_s": args.cold_budget_s, "warm_budget_s": args.warm_budget_s, "extra_arms": args.extra_arms, "smoke": args.smoke,
                       "store_written_this_run": store_seconds is not None, "store_write_seconds": store_seconds,
                       "arms_left_out": skipped, "arm_labels": labels},
        "summary": summary_rows,
        "cold": sections.get("cold"),
        "warm": sections.get("warm"),
        "elapsed_s": elapsed,
        "table": "\n".join(lines).strip(),
    }
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
