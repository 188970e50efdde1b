#!/usr/bin/env python3
"""Forward passes of an offloaded Llama against the plain model and against reading its bytes (issue #4's figures).

One model (a LlamaForCausalLM from a LlamaConfig, seeded random weights, about --size-gib; batch 1, a sequence of
--seq tokens per forward so that compute is not trivial) runs in three copies made from the same weights:

  plain   the model as built, no TensorStream
  full    tensorstream.offload with a budget of 1.1x the weights: everything fits
  half    tensorstream.offload with a budget of half the weights: the rest streams from the store every pass

Figures (DESIGN.md §8; see benchmarks/README.md):

(a) full / plain forward time. Target <= 1.05.
(b) half: bytes read per pass / (model bytes - resident bytes). Target <= 1.05.
    half: time per pass / max(plain forward time, bytes read per pass / raw read rate), where the raw read rate is
    a plain sequential read of the store's own data file (4 MiB requests; buffered, and O_DIRECT when cold; the
    faster of the two is used). Target <= 1.2. Measured twice: cold (the data file evicted with
    posix_fadvise(DONTNEED) and checked with mincore before the pass and before the raw read) and warm (the data
    file in the page cache, checked with mincore).

Arms are interleaved (plain, full, half warm, raw warm, half cold, raw cold; the order rotates by one arm every
round), at least 5 rounds (9 when the time budget allows), medians. Every pass is checked bit for bit against the
plain model's logits. It prints a table and writes benchmarks/results/offload-<date>-<hostname>.json with the
machine description. It is not a test: it never fails on a timing.

    make bench                                  # runs this after the store and engine benchmarks
    python3 benchmarks/offload.py --dir /mnt/nvme/scratch --size-gib 2 --rounds 7
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import datetime as _dt
import gc
import json
import mmap
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench_common as common
from bench_common import GB, GIB, MEMORY_FILE_SYSTEMS, MIB, REPO, RESULTS, default_base_dir, evict, mount_of, warm_up

READ_BLOCK = 4 * MIB

try:
    import torch
except ImportError:  # pragma: no cover
    sys.exit("offload.py needs torch (pip install torch)")
try:
    import transformers
except ImportError:  # pragma: no cover
    sys.exit("offload.py needs transformers (pip install transformers)")

if str(REPO / "python") not in sys.path:
    sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "examples"))
from demo import build_model, plan_llama  # noqa: E402  (the demo's model rule: one definition for both)
try:
    import tensorstream
    from tensorstream import _core
    from tensorstream.config import Config
except ImportError as error:  # pragma: no cover
    sys.exit(f"cannot import tensorstream._core ({error}); build it first: make build")


def offload_api():
    offload = getattr(tensorstream, "offload", None)
    stats = getattr(tensorstream, "get_model_statistics", None)
    if offload is None or stats is None:
        try:
            from tensorstream import torch as ts_torch
        except ImportError as error:
            sys.exit(f"tensorstream.offload is not available in this tree ({error})")
        offload, stats = ts_torch.offload, ts_torch.get_model_statistics
    return offload, stats


# ---- machine and file system -------------------------------------------------------------------------------------

def machine_description(bench_dir: Path) -> dict:
    uring, uring_reason = _core.io_uring_available()
    return {**common.machine_description(bench_dir), "torch_threads": torch.get_num_threads(),
            "transformers": transformers.__version__, "io_uring": uring, "io_uring_reason": uring_reason}


# ---- page cache --------------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def raw_read(path: Path, direct: bool) -> dict:
    """A plain sequential read of the whole file in 4 MiB requests into one page-aligned buffer."""
    buffer = mmap.mmap(-1, READ_BLOCK)
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        buffer.close()
        return {"seconds": float("nan"), "bytes": 0, "mode": "O_DIRECT unsupported"}
    try:
        total = 0
        start = time.perf_counter()
        while True:
            n = os.readv(fd, [buffer])
            if n <= 0:
                break
            total += n
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
        buffer.close()
    return {"seconds": seconds, "bytes": total, "mode": "O_DIRECT" if direct else "buffered",
            "gb_s": total / seconds / GB}


# ---- model -------------------------------------------------------------------------------------------------------

def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def forward(model, ids) -> tuple:
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(ids, use_cache=False).logits
        return time.perf_counter() - start, logits


# ---- rounds ------------------------------------------------------------------------------------------------------

def median(rounds: list, arm: str, key: str = "seconds") -> float:
    return statistics.median(r[arm][key] for r in rounds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dir", type=Path, default=None,
                   help="directory for the store (default: /var/tmp, else build/, never a tmpfs)")
    p.add_argument("--size-gib", type=float, default=1.0, help="weights of the model")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--seq", type=int, default=128, help="tokens per forward pass (batch 1)")
    p.add_argument("--rounds", type=int, default=9, help="rounds wanted (at least --min-rounds are always run)")
    p.add_argument("--min-rounds", type=int, default=5)
    p.add_argument("--time-budget-s", type=float, default=240.0,
                   help="stop adding rounds beyond --min-rounds when the next would end after this")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-cache arms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="where to write the results (default: benchmarks/results/)")
    args = p.parse_args(argv)

    offload, get_stats = offload_api()
    started = time.monotonic()
    base = args.dir if args.dir is not None else default_base_dir()
    base.mkdir(parents=True, exist_ok=True)
    fstype = mount_of(base)["fstype"]
    if fstype in MEMORY_FILE_SYSTEMS:
        print(f"warning: {base} is on {fstype}: cold arms measure memory, not storage", file=sys.stderr)
    need = int(args.size_gib * GIB * 1.1) + 256 * MIB
    if shutil.disk_usage(base).free < need:
        print(f"error: {base} has {shutil.disk_usage(base).free / GIB:.1f} GiB free, the run needs "
              f"{need / GIB:.1f} GiB", file=sys.stderr)
        return 2

    dtype = getattr(torch, args.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = plan_llama(args.size_gib * GIB, itemsize)
    work = Path(tempfile.mkdtemp(prefix="ts-bench-offload-", dir=base))
    machine = machine_description(work)
    print(f"offload: Llama {plan['num_hidden_layers']} layers, hidden {plan['hidden_size']}, {args.dtype}, batch 1 x "
          f"{args.seq} tokens, in {work} ({machine['filesystem']} on {machine['filesystem_source']}); "
          f"{machine['cpu_model']}, {machine['cpu_cores']} cores, {machine['ram_gib']} GiB RAM, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads)", flush=True)
    try:
        t0 = time.perf_counter()
        plain = build_model(plan, dtype, args.seed)
        model_bytes = weight_bytes(plain)
        full = copy.deepcopy(plain)
        half = copy.deepcopy(plain)
        build_s = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(args.seed + 1)
        ids = torch.randint(0, plan["vocab_size"], (1, args.seq), generator=gen)
        _, reference = forward(plain, ids)

        storage = work / "store"
        t0 = time.perf_counter()
        full = offload(full, Config(storage_path=str(storage), vram_budget_gb=model_bytes * 1.1 / GB)) or full
        full_offload_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        half = offload(half, Config(storage_path=str(storage), vram_budget_gb=model_bytes * 0.5 / GB)) or half
        half_offload_s = time.perf_counter() - t0
        gc.collect()
        stats_half = get_stats(half)
        data = storage / "models" / str(stats_half["model_id"]) / "data"
        print(f"  {model_bytes / GB:.3f} GB of weights built in {build_s:.1f} s; offloaded (store written) in "
              f"{full_offload_s:.1f} s, again with half the budget in {half_offload_s:.1f} s; data file "
              f"{data.stat().st_size / GB:.3f} GB", flush=True)

        mismatches = []

        def model_arm(name: str, model, cache: str = None) -> dict:
            cached = None
            if cache == "cold":
                cached = evict(data, max_left=0.01)
            elif cache == "warm":
                cached = warm_up(data)
            before = get_stats(model) if model is not plain else None
            seconds, logits = forward(model, ids)
            if not torch.equal(logits, reference):
                mismatches.append(name)
            out = {"seconds": seconds, "cached_before": cached}
            if before is not None:
                after = get_stats(model)
                out.update({"bytes_read": after["bytes_read"] - before["bytes_read"],
                            "stall_time_s": after["stall_time_s"] - before["stall_time_s"],
                            "resident_bytes": after["resident_bytes"], "static_bytes": after["static_bytes"],
                            "cache_hit_rate": after["cache_hit_rate"],
                            "io_throughput_mbps": after["io_throughput_mbps"], "evictions": after["evictions"],
                            "checksum_failures": after["checksum_failures"]})
            return out

        def raw_arm(cache: str) -> dict:
            if cache == "cold":
                arms = {}
                for direct in (False, True):
                    left = evict(data, max_left=0.01)
                    arms["direct" if direct else "buffered"] = dict(raw_read(data, direct), cached_before=left)
                valid = [a for a in arms.values() if a["bytes"]]
                best = max(valid, key=lambda a: a["gb_s"])
                return dict(best, variants=arms)
            cached = warm_up(data)
            return dict(raw_read(data, False), cached_before=cached)

        # Warm-up: each offloaded model runs once (the first pass learns the execution order), the plain one too.
        for model in (plain, full, half):
            forward(model, ids)
        stats_full, stats_half = get_stats(full), get_stats(half)
        for name, st in (("full", stats_full), ("half", stats_half)):
            print(f"  {name}: budget {st['budget_bytes'] / GB:.3f} GB, {st['resident_blocks']} block(s) resident "
                  f"by size ({st['resident_bytes'] / GB:.3f} GB), {st['streamed_blocks']} streamed blocks of which "
                  f"{st['static_bytes'] / GB:.3f} GB stay in the engine's static set, lookahead {st['lookahead']}, "
                  f"backend {st['backend']}", flush=True)

        rounds = []
        wanted = max(args.rounds, args.min_rounds)
        caches = ["warm"] + ([] if args.no_cold else ["cold"])
        for r in range(wanted):
            round_start = time.monotonic()
            row = {"round": r}
            arms = [("plain", lambda: model_arm("plain", plain)), ("full", lambda: model_arm("full", full))]
            for cache in caches:
                arms.append((f"half_{cache}", lambda c=cache: model_arm(f"half_{c}", half, c)))
                arms.append((f"raw_{cache}", lambda c=cache: raw_arm(c)))
            shift = r % len(arms)  # rotate the order every round: no arm always runs first or after a cold read
            row["order"] = [name for name, _ in arms[shift:] + arms[:shift]]
            for name, arm in arms[shift:] + arms[:shift]:
                row[name] = arm()
            rounds.append(row)
            text = (f"  round {r + 1}: plain {row['plain']['seconds']:.3f} s, full {row['full']['seconds']:.3f} s"
                    + "".join(f", half {c} {row[f'half_{c}']['seconds']:.3f} s "
                              f"({row[f'half_{c}']['bytes_read'] / GB:.3f} GB read), raw {c} "
                              f"{row[f'raw_{c}']['gb_s']:.2f} GB/s" for c in caches))
            print(text, flush=True)
            round_seconds = time.monotonic() - round_start
            if (r + 1 >= args.min_rounds and r + 1 < wanted
                    and time.monotonic() - started + round_seconds > args.time_budget_s):
                print(f"  (stopping after {r + 1} rounds: another would pass the {args.time_budget_s:.0f} s budget)")
                break

        plain_s = median(rounds, "plain")
        full_s = median(rounds, "full")
        resident = stats_half["resident_bytes"] + stats_half["static_bytes"]  # kept across passes
        non_resident = model_bytes - resident
        paired_full = statistics.median(r["full"]["seconds"] / r["plain"]["seconds"] for r in rounds)
        figures = {"plain_forward_s": plain_s, "full_forward_s": full_s, "full_over_plain": full_s / plain_s,
                   "full_over_plain_median_of_rounds": paired_full,
                   "full_target": 1.05, "model_bytes": model_bytes, "half_resident_bytes": resident,
                   "half_non_resident_bytes": non_resident}
        for cache in caches:
            half_s = median(rounds, f"half_{cache}")
            read = median(rounds, f"half_{cache}", "bytes_read")
            raw_gb_s = statistics.median(r[f"raw_{cache}"]["gb_s"] for r in rounds)
            io_s = read / (raw_gb_s * GB)
            bound = max(plain_s, io_s)
            paired = statistics.median(
                r[f"half_{cache}"]["seconds"]
                / max(r["plain"]["seconds"], r[f"half_{cache}"]["bytes_read"] / (r[f"raw_{cache}"]["gb_s"] * GB))
                for r in rounds)
            figures[cache] = {"half_forward_s": half_s, "bytes_read_per_pass": read,
                              "bytes_over_non_resident": read / non_resident if non_resident else float("nan"),
                              "bytes_over_model_minus_budget": read / (model_bytes - stats_half["budget_bytes"]),
                              "raw_read_gb_s": raw_gb_s, "raw_read_mode": rounds[-1][f"raw_{cache}"]["mode"],
                              "io_bound_s": io_s, "bound_s": bound, "half_over_bound": half_s / bound,
                              "half_over_bound_median_of_rounds": paired,
                              "stall_time_s": median(rounds, f"half_{cache}", "stall_time_s"),
                              "bytes_target": 1.05, "time_target": 1.2}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def verdict(value: float, target: float) -> str:
        return "meets target" if value <= target else "MISSES target"

    elapsed = time.monotonic() - started
    lines = [
        "",
        f"Offloaded forward passes: Llama {model_bytes / GB:.3f} GB {args.dtype}, batch 1 x {args.seq} tokens, "
        f"{len(rounds)} interleaved rounds, medians",
        f"  {'figure':<66} {'value':>9}  target",
        f"  {'plain forward (s)':<66} {plain_s:>9.3f}",
        f"  {'(a) budget 1.1x model: forward (s)':<66} {full_s:>9.3f}",
        f"  {'(a) full / plain':<66} {full_s / plain_s:>9.3f}  <= 1.05 ({verdict(full_s / plain_s, 1.05)})",
        f"  {'(a) full / plain, median of the per-round ratios':<66} {figures['full_over_plain_median_of_rounds']:>9.3f}",
        f"  {'(b) budget 0.5x model: resident / non-resident bytes (GB)':<66} "
        f"{resident / GB:>4.2f}/{non_resident / GB:.2f}",
    ]
    for cache in caches:
        f = figures[cache]
        lines += [
            f"  {cache}: data file " + ("evicted (posix_fadvise DONTNEED, mincore checked)" if cache == "cold"
                                        else "in page cache (mincore checked)"),
            f"  {'(b) forward (s)':<66} {f['half_forward_s']:>9.3f}",
            f"  {'(b) bytes read per pass (GB)':<66} {f['bytes_read_per_pass'] / GB:>9.3f}",
            f"  {'(b) bytes read / (model - resident)':<66} {f['bytes_over_non_resident']:>9.3f}  <= 1.05 "
            f"({verdict(f['bytes_over_non_resident'], 1.05)})",
            f"  {'(b) bytes read / (model - budget), information only':<66} "
            f"{f['bytes_over_model_minus_budget']:>9.3f}",
            f"  {'(b) raw sequential read of the data file (GB/s, ' + f['raw_read_mode'] + ')':<66} "
            f"{f['raw_read_gb_s']:>9.3f}",
            f"  {'(b) bound = max(plain forward, bytes read / raw rate) (s)':<66} {f['bound_s']:>9.3f}",
            f"  {'(b) forward / bound':<66} {f['half_over_bound']:>9.3f}  <= 1.2 "
            f"({verdict(f['half_over_bound'], 1.2)})",
            f"  {'(b) forward / bound, median of the per-round ratios':<66} "
            f"{f['half_over_bound_median_of_rounds']:>9.3f}",
            f"  {'(b) stall time per pass (s, engine statistics)':<66} {f['stall_time_s']:>9.3f}",
        ]
    spread = ", ".join(f"{arm.replace('_', ' ')} {min(r[arm]['seconds'] for r in rounds):.3f}-"
                       f"{max(r[arm]['seconds'] for r in rounds):.3f}"
                       for arm in ["plain", "full"] + [f"half_{c}" for c in caches])
    lines.append(f"  forward time spread over the rounds (min-max s): {spread}")
    identical = "yes" if not mismatches else "NO: " + ", ".join(sorted(set(mismatches)))
    lines.append(f"  outputs bit-identical to the plain model: {identical}")
    lines.append(f"\n({elapsed:.0f} s; {machine['filesystem']} at {machine['bench_dir']})")
    print("\n".join(lines))

    now = _dt.datetime.now(_dt.timezone.utc)
    out_path = args.json or RESULTS / f"offload-{now:%Y%m%d-%H%M%S}-{socket.gethostname()}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "offload",
        "date_utc": now.isoformat(timespec="seconds"),
        "machine": machine,
        "parameters": {"model": "LlamaForCausalLM", "config": plan, "dtype": args.dtype, "model_bytes": model_bytes,
                       "batch": 1, "seq": args.seq, "seed": args.seed, "budget_full_gb": model_bytes * 1.1 / GB,
                       "budget_half_gb": model_bytes * 0.5 / GB, "rounds": len(rounds), "rounds_wanted": wanted,
                       "caches": caches, "raw_read_block": READ_BLOCK},
        "offload_stats": {"full": stats_full, "half": stats_half},
        "figures": figures,
        "bit_identical": not mismatches,
        "mismatches": sorted(set(mismatches)),
        "rounds": rounds,
        "elapsed_s": elapsed,
        "table": "\n".join(lines).strip(),
    }
    out_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
