#!/usr/bin/env python3
"""R1: bytes the engine reads per forward pass against the offline optimum (benchmarks/residency_optimum.py).

Two Llamas (seeded random float32), each offloaded at budgets of 0.25, 0.5 and 0.75 of its streamed bytes, with
prefetch NONE and NEXT_LAYER:

* `equal`: 8 equal layers; embedding and head below min_layer_size, so resident. The optimum is exact.
* `mixed`: the demo's proportions (hidden 512, intermediate 1376, vocabulary 8000: an lm_head of 1.3 layers; the
  embedding is read by rows, outside the budget). The optimum lies between bounds; the ratio is taken against the
  achievable upper bound (the better of Belady on bytes and a knapsack static set), which a policy may beat.

After warm-up passes (the order is learned), the engine's bytes read per pass (`get_model_statistics`, blocks held
under the budget only) are divided by the optimum for the engine's own block sizes and the budget it actually used
(`budget_bytes`, after its rounding). Bytes are deterministic, so this measures policy, not speed; make test runs
the smoke form and asserts the target. Target (#16): <= 1.05 x the optimum.

    python3 benchmarks/residency.py [--passes 28] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, default_base_dir, machine_description, summary_row  # noqa: E402

import residency_optimum  # noqa: E402

STRATEGIES = {"none": 0, "next_layer": 1}
FRACTIONS = (0.25, 0.5, 0.75)
# name: (hidden, intermediate, vocabulary, layers); full size, smoke size
MODELS = {"equal": ((1024, 1024, 256, 8), (256, 256, 256, 8)),
          "mixed": ((512, 1376, 8000, 8), (128, 344, 2000, 8))}


def build(shape):
    import torch
    import transformers

    hidden, inter, vocab, layers = shape
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=8, vocab_size=vocab,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def measure(plain, name: str, strategy: str, fraction: float, passes: int, tmp: str) -> dict:
    import torch

    import tensorstream as ts

    layer_bytes = sum(t.numel() * t.element_size() for t in plain.model.layers[0].parameters())
    vocab = plain.config.vocab_size
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    streamed = sum(t.numel() * t.element_size() for t in plain.parameters())
    if name == "equal":  # embedding and head resident: the layers are what streams
        streamed = layer_bytes * plain.config.num_hidden_layers
    model = ts.offload(copy.deepcopy(plain), ts.Config(
        storage_path=tmp, vram_budget_gb=streamed * fraction / 1e9, prefetch_strategy=strategy,
        min_layer_size=layer_bytes // 2, progress=False))
    try:
        with torch.no_grad():
            for _ in range(3):
                model(ids)
            ts.get_model_statistics(model, reset=True)
            for _ in range(passes):
                model(ids)
        stats = ts.get_model_statistics(model)
    finally:
        model.cleanup_tensorstream()
    held = {k: v for k, v in stats["blocks"].items() if not v.get("read_by_rows")}
    sizes = [v["slot_bytes"] for v in held.values()]
    order = [list(held).index(k) for k in held]  # blocks are listed in execution order
    # In slot bytes, the optimum's unit (a block's stored bytes round up to whole pages in its slot).
    read = sum(v["loads"] * v["slot_bytes"] for v in held.values()) / passes
    lookahead = STRATEGIES[strategy]
    try:
        best = residency_optimum.optimum(sizes, order, stats["budget_bytes"], lookahead)
    except ValueError:  # the budget cannot hold a block and the next one: no prefetch fits, so none is pinned
        lookahead = 0
        best = residency_optimum.optimum(sizes, order, stats["budget_bytes"], lookahead)
    return {"model": name, "strategy": strategy, "fraction": fraction, "budget_bytes": stats["budget_bytes"],
            "block_bytes": sizes, "read_bytes_per_pass": read,
            "stored_bytes_read_per_pass": sum(v["bytes_read"] for v in held.values()) / passes, "optimum_bytes_per_pass": best.upper,
            "lower_bound_bytes_per_pass": best.lower, "exact": best.exact, "optimum_policy": best.policy,
            "optimum_lookahead": lookahead, "ratio": read / best.upper if best.upper > 0 else (1.0 if read == 0 else float("inf")),
            "layer_bytes": layer_bytes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passes", type=int, default=28, help="measured passes (the steady state repeats every few)")
    p.add_argument("--smoke", action="store_true", help="small layers (make test's check)")
    p.add_argument("--time-budget-s", type=float, default=None, help="accepted for run_all.py")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    started = time.monotonic()
    results, summary = [], []
    with tempfile.TemporaryDirectory(dir=default_base_dir(), prefix="ts-bench-residency-") as tmp:
        for name, shapes in MODELS.items():
            plain = build(shapes[1] if args.smoke else shapes[0])
            for strategy in STRATEGIES:
                for fraction in FRACTIONS:
                    row = measure(plain, name, strategy, fraction, args.passes, tmp)
                    results.append(row)
                    unit = row["layer_bytes"]
                    print(f"{name:5s} {strategy:10s} budget {fraction:g}: read {row['read_bytes_per_pass'] / unit:.3f} "
                          f"layers per pass, optimum {row['optimum_bytes_per_pass'] / unit:.3f}"
                          f"{'' if row['exact'] else ' (upper bound; lower %.3f)' % (row['lower_bound_bytes_per_pass'] / unit)}"
                          f": {row['ratio']:.3f}x", flush=True)
                    if row["optimum_bytes_per_pass"] > 0:
                        summary.append(summary_row(
                            "residency", f"R1 bytes per pass / optimum, {name} blocks, budget {fraction:g}", strategy,
                            row["read_bytes_per_pass"] / 1e6, "MB", baseline="offline optimum" if row["exact"] else
                            "offline optimum (upper bound)", baseline_value=row["optimum_bytes_per_pass"] / 1e6,
                            target=1.05, higher_is_better=False,
                            note=f"blocks {sorted(set(round(b / 1e6, 1) for b in row['block_bytes']))} MB"))
    table = "\n".join(f"{r['model']} {r['strategy']} {r['fraction']:g}: {r['ratio']:.3f}" for r in results)
    report = {"suite": "residency", "machine": machine_description(default_base_dir()), "results": results,
              "summary": summary, "table": table, "elapsed_s": time.monotonic() - started}
    out = args.json or RESULTS / f"residency-{time.strftime('%Y%m%d-%H%M')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
