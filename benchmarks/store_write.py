#!/usr/bin/env python3
"""Store write throughput against `dd` on the same file system, and the compression ratio of bf16 weights.

Two figures (DESIGN.md §8; see benchmarks/README.md):

1. Write throughput. Arm "store": a StoreWriter writes --size-gib of bf16 weights (blocks of ~64 MiB, chunks of
   4 MiB, checksums on as always, no compression) and commits (fsync of the data file, manifest, rename, fsync of
   models/). Arm "dd": `dd if=/dev/zero of=FILE bs=4M count=… conv=fsync`, the plain-tool ceiling for a buffered
   sequential write that ends durable. Both write into the same directory; arms alternate A B A B …, at least 3
   rounds (5 when the time budget allows); outputs are deleted (and the file system synced) between arms; the
   figures are medians. Target: store / dd ≥ 0.8.
2. Compression ratio (raw bytes / stored bytes, from commit()) of normally distributed bf16 weights
   (torch.randn, seed 0, 256 MiB) with byte grouping: zstd at compression_level 5 and 9, lz4 at level 1.

It prints a table and writes benchmarks/results/store_write-<date>-<hostname>.json with the machine description.
It is not a test: it never fails on a timing.

    make bench                                  # = python3 benchmarks/store_write.py
    python3 benchmarks/store_write.py --dir /mnt/nvme/scratch --size-gib 8 --rounds 5
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import GB, GIB, MEMORY_FILE_SYSTEMS, MIB, REPO, RESULTS, machine_description, default_base_dir, mount_of


try:
    import torch
except ImportError:  # pragma: no cover - the benchmark needs torch for its weights
    sys.exit("store_write.py needs torch (pip install torch)")

if str(REPO / "python") not in sys.path:
    sys.path.insert(0, str(REPO / "python"))
try:
    from tensorstream import _core
except ImportError as error:  # pragma: no cover
    sys.exit(f"cannot import tensorstream._core ({error}); build it first: make build")


# ---- machine and file system -------------------------------------------------------------------------------------

# ---- arms --------------------------------------------------------------------------------------------------------

class WeightPool:
    """`distinct` blocks of bf16 normal-random weights (~block_bytes each, split into three tensors like a layer's
    projections), reused cyclically: the store's cost does not depend on the values when compression is off."""

    def __init__(self, block_bytes: int, distinct: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        numel = block_bytes // 2
        self.blocks = [torch.randn(numel, generator=gen, dtype=torch.bfloat16) for _ in range(distinct)]
        quarter = numel // 4
        # (name, offset, numel) of the tensors inside a block: 1/4, 1/4, 1/2 of it.
        self.layout = [("q_proj", 0, quarter), ("k_proj", quarter, quarter), ("mlp", 2 * quarter, numel - 2 * quarter)]

    def write(self, storage, model_id: str, nblocks: int, chunk_size: int, level: int = 0) -> dict:
        writer = _core.StoreWriter(storage, model_id, chunk_size=chunk_size, compression_level=level, replace=False)
        try:
            for b in range(nblocks):
                block = self.blocks[b % len(self.blocks)]
                writer.begin_block(f"layers.{b}")
                base = block.data_ptr()
                for name, offset, numel in self.layout:
                    writer.add_tensor(f"layers.{b}.{name}", "bfloat16", [numel], base + 2 * offset, 2 * numel)
            return writer.commit()
        finally:
            del writer


def store_arm(storage, pool: WeightPool, model_id: str, nblocks: int, chunk_size: int) -> dict:
    t0 = time.perf_counter()
    out = pool.write(storage, model_id, nblocks, chunk_size)  # includes commit: fsync, manifest, rename, fsync
    seconds = time.perf_counter() - t0
    storage.remove_model(model_id)
    return {"seconds": seconds, "bytes": out["raw_bytes"], "stored_bytes": out["stored_bytes"]}


def dd_arm(path: Path, nbytes: int, block: int = 4 * MIB) -> dict:
    count = nbytes // block
    t0 = time.perf_counter()
    proc = subprocess.run(["dd", "if=/dev/zero", f"of={path}", f"bs={block}", f"count={count}", "conv=fsync"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"dd failed: {proc.stderr.strip()}")
    path.unlink()
    return {"seconds": seconds, "bytes": count * block, "dd_says": proc.stderr.strip().splitlines()[-1]}


def settle() -> None:
    """Lets write-back of the previous arm (and the deletion of its output) finish before the next one starts."""
    os.sync()
    time.sleep(0.5)


# ---- compression ratio -------------------------------------------------------------------------------------------

def compression_ratios(storage, ratio_bytes: int, best_sample_bytes: int, chunk_size: int) -> list:
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(ratio_bytes // 2, generator=gen, dtype=torch.bfloat16)
    rows = []
    for level, codec in ((1, "lz4"), (5, "zstd 3"), (9, "zstd 19")):
        nbytes = ratio_bytes if level != 9 or best_sample_bytes <= 0 else min(ratio_bytes, best_sample_bytes)
        block_bytes = 64 * MIB
        model_id = f"ratio-level{level}"
        writer = _core.StoreWriter(storage, model_id, chunk_size=chunk_size, compression_level=level, replace=False)
        t0 = time.perf_counter()
        try:
            for b, start in enumerate(range(0, nbytes, block_bytes)):
                size = min(block_bytes, nbytes - start)
                writer.begin_block(f"b{b}")
                writer.add_tensor(f"b{b}.w", "bfloat16", [size // 2], weights.data_ptr() + start, size)
            out = writer.commit()
        finally:
            del writer
        seconds = time.perf_counter() - t0
        storage.remove_model(model_id)
        rows.append({"compression_level": level, "codec": codec, "byte_grouping": True, "raw_bytes": out["raw_bytes"],
                     "stored_bytes": out["stored_bytes"], "ratio": out["raw_bytes"] / out["stored_bytes"],
                     "seconds": seconds, "write_gb_s": out["raw_bytes"] / seconds / GB})
    return rows


# ---- main --------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dir", type=Path, default=None,
                   help="directory on the file system to measure (default: /var/tmp, else build/, never a tmpfs)")
    p.add_argument("--size-gib", type=float, default=2.0, help="bytes each write arm writes")
    p.add_argument("--rounds", type=int, default=5, help="A B rounds wanted (at least 3 are always run)")
    p.add_argument("--min-rounds", type=int, default=3)
    p.add_argument("--time-budget-s", type=float, default=210.0,
                   help="stop adding rounds beyond --min-rounds when the next would end after this")
    p.add_argument("--chunk-mib", type=int, default=4)
    p.add_argument("--block-mib", type=int, default=64)
    p.add_argument("--ratio-mib", type=int, default=256, help="bf16 weights for the compression ratios (0: skip)")
    p.add_argument("--best-sample-mib", type=int, default=32,
                   help="prefix of those weights used for level 9 (zstd 19 runs at a few MB/s per core; 0: all)")
    p.add_argument("--json", type=Path, default=None, help="where to write the results (default: benchmarks/results/)")
    args = p.parse_args(argv)

    started = time.monotonic()
    base = args.dir if args.dir is not None else default_base_dir()
    base.mkdir(parents=True, exist_ok=True)
    fstype = mount_of(base)["fstype"]
    if fstype in MEMORY_FILE_SYSTEMS:
        print(f"warning: {base} is on {fstype}: this measures memory, not storage", file=sys.stderr)
    chunk_size = args.chunk_mib * MIB
    block_bytes = args.block_mib * MIB
    nblocks = max(1, round(args.size_gib * GIB / block_bytes))
    total = nblocks * block_bytes
    need = total + args.ratio_mib * MIB + 256 * MIB
    if shutil.disk_usage(base).free < need:
        print(f"error: {base} has {shutil.disk_usage(base).free / GIB:.1f} GiB free, the run needs {need / GIB:.1f} GiB",
              file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="ts-bench-", dir=base))
    machine = machine_description(work)
    print(f"store_write: {total / GIB:.2f} GiB per arm in {work} ({machine['filesystem']} on "
          f"{machine['filesystem_source']}); {machine['cpu_model']}, {machine['cpu_cores']} cores, "
          f"{machine['ram_gib']} GiB RAM, kernel {machine['kernel']}", flush=True)
    try:
        storage = _core.StorageDirectory.open_or_create(str(work / "store"))
        pool = WeightPool(block_bytes, distinct=min(nblocks, 4))
        rounds = []
        wanted = max(args.rounds, args.min_rounds)
        for r in range(wanted):
            round_start = time.monotonic()
            settle()
            store = store_arm(storage, pool, f"bench-{r}", nblocks, chunk_size)
            settle()
            dd = dd_arm(work / "dd.out", total)
            rounds.append({"round": r, "store": store, "dd": dd,
                           "store_gb_s": store["bytes"] / store["seconds"] / GB,
                           "dd_gb_s": dd["bytes"] / dd["seconds"] / GB})
            rounds[-1]["ratio"] = rounds[-1]["store_gb_s"] / rounds[-1]["dd_gb_s"]
            print(f"  round {r + 1}: store {rounds[-1]['store_gb_s']:.3f} GB/s ({store['seconds']:.2f} s), "
                  f"dd {rounds[-1]['dd_gb_s']:.3f} GB/s ({dd['seconds']:.2f} s)", flush=True)
            round_seconds = time.monotonic() - round_start
            if (r + 1 >= args.min_rounds and r + 1 < wanted
                    and time.monotonic() - started + round_seconds > args.time_budget_s):
                print(f"  (stopping after {r + 1} rounds: another would pass the {args.time_budget_s:.0f} s budget)")
                break
        store_med = statistics.median(x["store_gb_s"] for x in rounds)
        dd_med = statistics.median(x["dd_gb_s"] for x in rounds)
        settle()
        ratios = (compression_ratios(storage, args.ratio_mib * MIB, args.best_sample_mib * MIB, chunk_size)
                  if args.ratio_mib > 0 else [])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    elapsed = time.monotonic() - started
    lines = [
        "",
        f"Write throughput: {total / GIB:.2f} GiB of bf16, {len(rounds)} interleaved rounds (A=store, B=dd), medians",
        f"  {'arm':<58} {'GB/s':>7} {'min':>7} {'max':>7}",
    ]
    for label, key in ((f"store (chunk {args.chunk_mib} MiB, blocks {args.block_mib} MiB, xxh3, raw, commit)",
                        "store_gb_s"),
                       ("dd if=/dev/zero bs=4M conv=fsync", "dd_gb_s")):
        values = [x[key] for x in rounds]
        lines.append(f"  {label:<58} {statistics.median(values):>7.3f} {min(values):>7.3f} {max(values):>7.3f}")
    verdict = "meets" if store_med / dd_med >= 0.8 else "below"
    lines.append(f"  {'store / dd (ratio of medians; target >= 0.80)':<58} {store_med / dd_med:>7.3f}   ({verdict} target)")
    if ratios:
        lines += ["", "Compression of bf16 randn weights (seed 0), byte grouping on, chunk "
                      f"{args.chunk_mib} MiB: raw bytes / stored bytes",
                  f"  {'level':>5} {'codec':<8} {'sample':>9} {'ratio':>7} {'write GB/s':>11}"]
        for row in ratios:
            lines.append(f"  {row['compression_level']:>5} {row['codec']:<8} {row['raw_bytes'] / MIB:>5.0f} MiB "
                         f"{row['ratio']:>7.3f} {row['write_gb_s']:>11.3f}")
    lines.append(f"\n({elapsed:.0f} s; {machine['filesystem']} at {machine['bench_dir']})")
    print("\n".join(lines))

    now = _dt.datetime.now(_dt.timezone.utc)
    out_path = args.json or RESULTS / f"store_write-{now:%Y%m%d-%H%M%S}-{socket.gethostname()}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "store_write",
        "date_utc": now.isoformat(timespec="seconds"),
        "machine": machine,
        "parameters": {"size_bytes": total, "chunk_size": chunk_size, "block_bytes": block_bytes, "blocks": nblocks,
                       "tensors_per_block": 3, "dtype": "bfloat16", "compression_level": 0, "checksums": "xxh3-64",
                       "rounds": len(rounds), "rounds_wanted": wanted, "dd_command":
                           f"dd if=/dev/zero of=FILE bs=4194304 count={total // (4 * MIB)} conv=fsync",
                       "ratio_bytes": args.ratio_mib * MIB, "best_sample_bytes": args.best_sample_mib * MIB},
        "write": {"store_gb_s_median": store_med, "dd_gb_s_median": dd_med, "store_over_dd": store_med / dd_med,
                  "store_over_dd_median_of_rounds": statistics.median(x["ratio"] for x in rounds),
                  "target": 0.8, "rounds": rounds},
        "compression": ratios,
        "elapsed_s": elapsed,
        "table": "\n".join(lines).strip(),
    }
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
