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
   (torch.randn, seed 0, 256 MiB) at compression_level 5, 1 and 9 (bf16 chunks take the exponent codec; level 9 also
   tries grouped zstd 19 and keeps the smaller).

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

from bench_common import (GB, GIB, MEMORY_FILE_SYSTEMS, MIB, REPO, RESULTS, default_base_dir, machine_description,
                          mount_of, summary_row, warm_up)


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


LEVELS = {"store raw": (0, "raw"), "store level 5": (5, "exponent codec"), "store level 1": (1, "exponent codec")}


def cpu_self() -> float:
    r = os.times()
    return r.user + r.system


def store_arm(storage, pool: WeightPool, model_id: str, nblocks: int, chunk_size: int, level: int) -> dict:
    """Writes and commits the model at `level`; the throughput divides the input (raw) bytes by the time."""
    c0 = cpu_self()
    t0 = time.perf_counter()
    out = pool.write(storage, model_id, nblocks, chunk_size, level)  # includes commit: fsync, manifest, rename, fsync
    seconds = time.perf_counter() - t0
    cpu = cpu_self() - c0  # the writer's encode threads are in-process
    storage.remove_model(model_id)
    return {"seconds": seconds, "bytes": out["raw_bytes"], "stored_bytes": out["stored_bytes"], "cpu_s": cpu}


def write_dd_source(pool: WeightPool, path: Path, nblocks: int) -> None:
    """The bytes dd copies: the same weights the store arms write, in the same order, in a file that is fsynced
    (so its write-back cannot spill into an arm) and stays in the page cache (checked before each dd arm).
    Not /dev/zero: on thin-provisioned or deduplicating virtual disks a block of zeros is not an ordinary write
    (on the 2-core VM, dd from /dev/zero reached 0.54-0.60 GB/s while the same dd of random bytes reached
    0.57-1.8 GB/s), so zeros would measure the host's zero handling, not the writes the store makes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for b in range(nblocks):
            data = memoryview(pool.blocks[b % len(pool.blocks)].view(torch.uint8).numpy())
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def dd_arm(path: Path, nbytes: int, source: Path = None, block: int = 4 * MIB) -> dict:
    count = nbytes // block
    if source is not None:
        cached = warm_up(source)
        if cached < 0.99:
            print(f"  warning: only {cached:.1%} of the dd source is cached", file=sys.stderr)
    t0 = time.perf_counter()
    proc = subprocess.run(["dd", f"if={source or '/dev/zero'}", f"of={path}", f"bs={block}", f"count={count}",
                           "conv=fsync"], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"dd failed: {proc.stderr.strip()}")
    path.unlink()
    return {"seconds": seconds, "bytes": count * block, "dd_says": proc.stderr.strip().splitlines()[-1]}


def settle(pause_s: float) -> None:
    """Lets write-back of the previous arm (and the deletion of its output) finish before the next one starts.
    On a virtual disk `sync` returns when the host has taken the writes, not when it has stored them: with 0.5 s
    pauses the 2-core VM's arms fell into a fast (1.5-2 GB/s) and a slow (0.4-0.6 GB/s) mode almost at random,
    store and dd alike, so the ratio of medians swung from 0.7 to 2.9; with 2 s the modes mostly disappear."""
    os.sync()
    time.sleep(pause_s)


# ---- compression ratio -------------------------------------------------------------------------------------------

def best_level_ratio(storage, sample_bytes: int, chunk_size: int) -> dict:
    """compression_level 9 (the exponent codec and grouped zstd 19, the smaller kept) on `sample_bytes` of the same bf16 randn weights (seed 0):
    zstd 19 runs at a few MB/s per core, so it is measured once on a sample, outside the timed rounds. The weights
    are i.i.d., so a prefix gives the ratio of the whole."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(sample_bytes // 2, generator=gen, dtype=torch.bfloat16)
    writer = _core.StoreWriter(storage, "ratio-level9", chunk_size=chunk_size, compression_level=9, replace=False)
    t0 = time.perf_counter()
    try:
        writer.begin_block("b0")
        writer.add_tensor("b0.w", "bfloat16", [sample_bytes // 2], weights.data_ptr(), sample_bytes)
        out = writer.commit()
    finally:
        del writer
    seconds = time.perf_counter() - t0
    storage.remove_model("ratio-level9")
    return {"compression_level": 9, "codec": "exponent or zstd 19", "byte_grouping": True, "raw_bytes": out["raw_bytes"],
            "stored_bytes": out["stored_bytes"], "ratio": out["raw_bytes"] / out["stored_bytes"],
            "seconds": seconds, "write_gb_s": out["raw_bytes"] / seconds / GB}


# ---- main --------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dir", type=Path, default=None,
                   help="directory on the file system to measure (default: /var/tmp, else build/, never a tmpfs)")
    p.add_argument("--size-gib", type=float, default=1.0, help="bytes each write arm writes (input bytes)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds wanted")
    p.add_argument("--min-rounds", type=int, default=3, help="rounds always run, whatever the budget")
    p.add_argument("--time-budget-s", type=float, default=120.0,
                   help="rounds beyond --min-rounds are only started while they fit in this (the whole run)")
    p.add_argument("--no-lz4", action="store_true", help="leave out the compression_level 1 arm")
    p.add_argument("--dd-zero", action="store_true",
                   help="dd copies /dev/zero instead of a cached file of the store arms' weights")
    p.add_argument("--settle-s", type=float, default=2.0,
                   help="pause after `sync` before every arm, so the previous arm's write-back does not spill into it")
    p.add_argument("--chunk-mib", type=int, default=4)
    p.add_argument("--block-mib", type=int, default=64)
    p.add_argument("--best-sample-mib", type=float, default=16,
                   help="bf16 weights for the level 9 ratio, measured once outside the rounds (0: skip)")
    p.add_argument("--smoke", action="store_true",
                   help="a few seconds: 64 MiB per arm in 16 MiB blocks, 1 round, 1 MiB level 9 sample (checks that "
                        "the script runs, not a measurement)")
    p.add_argument("--json", type=Path, default=None, help="where to write the results (default: benchmarks/results/)")
    args = p.parse_args(argv)
    pause_s = args.settle_s
    if args.smoke:
        args.size_gib, args.block_mib, args.best_sample_mib = 1 / 16, 16, 1
        args.rounds = args.min_rounds = 1
        pause_s = 0.05

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
    sample = int(args.best_sample_mib * MIB) // 4096 * 4096
    need = total * (1 if args.dd_zero else 2) + sample + 256 * MIB
    if shutil.disk_usage(base).free < need:
        print(f"error: {base} has {shutil.disk_usage(base).free / GIB:.1f} GiB free, the run needs {need / GIB:.1f} GiB",
              file=sys.stderr)
        return 2
    arm_names = ["store raw", "store level 5"] + ([] if args.no_lz4 else ["store level 1"]) + ["dd"]

    work = Path(tempfile.mkdtemp(prefix="ts-bench-", dir=base))
    machine = machine_description(work)
    cores = machine["cpu_cores_usable"] or 1
    print(f"store_write: {total / GIB:.2f} GiB per arm in {work} ({machine['filesystem']} on "
          f"{machine['filesystem_source']}); {machine['cpu_model']}, {machine['cpu_cores']} cores, "
          f"{machine['ram_gib']} GiB RAM, kernel {machine['kernel']}", flush=True)
    best = None
    try:
        storage = _core.StorageDirectory.open_or_create(str(work / "store"))
        pool = WeightPool(block_bytes, distinct=min(nblocks, 4))
        arms = {name: (lambda r, level=level: store_arm(storage, pool, f"bench-{r}-{level}", nblocks, chunk_size,
                                                        level))
                for name, (level, _codec) in LEVELS.items() if name in arm_names}
        dd_source = None
        if not args.dd_zero:
            dd_source = work / "dd.src"
            write_dd_source(pool, dd_source, nblocks)
        arms["dd"] = lambda r: dd_arm(work / "dd.out", total, dd_source)
        rounds = []
        wanted = max(args.rounds, args.min_rounds)
        for r in range(wanted):
            round_start = time.monotonic()
            # Interleaved, the order rotating by one arm per round: no arm always runs first or after the same one.
            order = arm_names[r % len(arm_names):] + arm_names[:r % len(arm_names)]
            results = {}
            for name in order:
                settle(pause_s)
                result = arms[name](r)
                result["gb_s"] = result["bytes"] / result["seconds"] / GB
                results[name] = result
            results["order"] = order
            rounds.append(results)
            print(f"  round {r + 1}: " + ", ".join(f"{n} {results[n]['gb_s']:.3f}" for n in arm_names) + " GB/s",
                  flush=True)
            round_seconds = time.monotonic() - round_start
            if (r + 1 >= args.min_rounds and r + 1 < wanted
                    and time.monotonic() - started + round_seconds > args.time_budget_s):
                print(f"  (stopping after {r + 1} rounds: another would pass the {args.time_budget_s:.0f} s budget)")
                break
        if sample > 0:
            settle(pause_s)
            best = best_level_ratio(storage, sample, chunk_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for name in arm_names:
        values = [x[name]["gb_s"] for x in rounds]
        summary[name] = {"gb_s_median": statistics.median(values), "gb_s_min": min(values), "gb_s_max": max(values)}
        if name != "dd":
            cpu = statistics.median(x[name]["cpu_s"] / x[name]["seconds"] for x in rounds)
            summary[name]["cores_busy_median"] = cpu
            summary[name]["stored_bytes"] = rounds[0][name]["stored_bytes"]
            summary[name]["bytes_in"] = rounds[0][name]["bytes"]
            summary[name]["ratio_to_dd"] = summary[name]["gb_s_median"] / summary["dd"]["gb_s_median"] \
                if "dd" in summary else None
    dd_med = statistics.median(x["dd"]["gb_s"] for x in rounds)
    compression = []
    for name in arm_names[:-1]:
        level, codec = LEVELS[name]
        if level:
            raw, stored = rounds[0][name]["bytes"], rounds[0][name]["stored_bytes"]
            compression.append({"compression_level": level, "codec": codec, "byte_grouping": True, "raw_bytes": raw,
                                "stored_bytes": stored, "ratio": raw / stored,
                                "write_gb_s": summary[name]["gb_s_median"]})
    if best:
        compression.append(best)

    elapsed = time.monotonic() - started
    labels = {"store raw": f"store raw (chunk {args.chunk_mib} MiB, blocks {args.block_mib} MiB, xxh3, commit)",
              "store level 5": "store level 5: bf16 chunks take the exponent codec, xxh3, commit",
              "store level 1": "store level 1: the same codec for floats (levels differ for other dtypes), xxh3, commit",
              "dd": f"dd if={'/dev/zero' if args.dd_zero else 'WEIGHTS'} bs=4M conv=fsync"}
    lines = [
        "",
        f"S3 store write: {total / GIB:.2f} GiB of bf16 randn per arm, {len(rounds)} interleaved rounds, medians "
        "(GB/s of input bytes; cores busy = process CPU s / wall s)",
        f"  {'arm':<54} {'GB/s':>7} {'min':>7} {'max':>7} {'cores':>6} {'/ dd':>6}",
    ]
    for name in arm_names:
        s = summary[name]
        busy = f"{s['cores_busy_median']:.2f}" if "cores_busy_median" in s else ""
        rel = f"{s['gb_s_median'] / dd_med:.3f}" if name != "dd" else ""
        lines.append(f"  {labels[name]:<54} {s['gb_s_median']:>7.3f} {s['gb_s_min']:>7.3f} {s['gb_s_max']:>7.3f} "
                     f"{busy:>6} {rel:>6}")
    summary_rows = []
    for name in arm_names[:-1]:
        s = summary[name]
        r = s["gb_s_median"] / dd_med
        per_round = statistics.median(x[name]["gb_s"] / x["dd"]["gb_s"] for x in rounds)
        verdict = "meets" if r >= 0.8 else "BELOW"
        lines.append(f"  target {name} / dd >= 0.80: {r:.3f} ({verdict}; median of round ratios {per_round:.3f})")
        note = f"{total / GIB:.2f} GiB, {len(rounds)} rounds; median of round ratios {per_round:.3f}"
        level = LEVELS[name][0]
        if level:
            note += f"; {LEVELS[name][1]}, ratio {rounds[0][name]['bytes'] / s['stored_bytes']:.3f}"
        if r < 0.8:
            # Split the arm's median time: writing its stored bytes at dd's rate (dd writes and fsyncs the same file
            # system), and the rest, which is the writer's CPU work. The writer overlaps the two (it writes one batch
            # of chunks while the next compresses), so the split says how much time is left beyond the writing.
            seconds = statistics.median(x[name]["seconds"] for x in rounds)
            writing = s["stored_bytes"] / (dd_med * GB)
            work = max(0.0, seconds - writing)
            what = "compression and checksums" if level else "checksums and per-chunk writes"
            if work >= 0.5 * seconds:
                note += (f"; bounded by CPU: of {seconds:.1f} s, {writing:.1f} s would write the stored bytes at dd's "
                         f"rate and the other {work:.1f} s is {what} not hidden behind them "
                         f"({s['bytes_in'] / work / GB:.2f} GB/s; this process kept {s['cores_busy_median']:.1f} of "
                         f"{cores} cores busy, other jobs share them)")
            else:
                note += (f"; bounded by writes: of {seconds:.1f} s, {writing:.1f} s would write the stored bytes at "
                         f"dd's rate ({s['cores_busy_median']:.1f} of {cores} cores busy)")
        summary_rows.append(summary_row("store_write", "S3 store write", name, s["gb_s_median"], "GB/s",
                                        baseline="dd conv=fsync", baseline_value=dd_med, target=0.8, note=note))
    if compression:
        lines += ["", f"Compression of bf16 randn weights (seed 0), byte grouping on, chunk {args.chunk_mib} MiB: "
                      "raw bytes / stored bytes",
                  f"  {'level':>5} {'codec':<8} {'input':>9} {'ratio':>7} {'write GB/s':>11}"]
        for row in compression:
            lines.append(f"  {row['compression_level']:>5} {row['codec']:<8} {row['raw_bytes'] / MIB:>5.0f} MiB "
                         f"{row['ratio']:>7.3f} {row['write_gb_s']:>11.3f}")
            arm = {5: "store level 5", 1: "store level 1", 9: "store level 9"}[row["compression_level"]]
            summary_rows.append(summary_row(
                "store_write", "S3 compression ratio", arm, row["ratio"], "x",
                note=f"raw / stored bytes of bf16 randn, {row['raw_bytes'] / MIB:.0f} MiB, {row['codec']} with byte "
                     "grouping" + (", measured once on a sample" if row["compression_level"] == 9 else "")))
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
                       "tensors_per_block": 3, "dtype": "bfloat16", "checksums": "xxh3-64",
                       "arms": {n: labels[n] for n in arm_names},
                       "compression_levels": {n: LEVELS[n][0] for n in arm_names if n in LEVELS},
                       "rounds": len(rounds), "rounds_wanted": wanted, "min_rounds": args.min_rounds,
                       "time_budget_s": args.time_budget_s, "settle_s": pause_s, "smoke": args.smoke, "dd_command":
                           f"dd if={'/dev/zero' if args.dd_zero else 'WEIGHTS'} of=FILE bs=4194304 "
                           f"count={total // (4 * MIB)} conv=fsync",
                       "dd_source": "/dev/zero" if args.dd_zero else
                           "WEIGHTS: a cached, fsynced file of the store arms' weights in their order",
                       "best_sample_bytes": sample},
        "summary": summary_rows,
        "write": {"arms": summary, "dd_gb_s_median": dd_med, "target": 0.8, "rounds": rounds},
        "compression": compression,
        "elapsed_s": elapsed,
        "table": "\n".join(lines).strip(),
    }
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
