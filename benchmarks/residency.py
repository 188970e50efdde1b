#!/usr/bin/env python3
"""R1: bytes the engine reads per forward pass against the offline optimum (benchmarks/residency_optimum.py).

A Llama of 8 equal layers (seeded random float32; embedding and head below min_layer_size, so resident) is offloaded
at budgets of 0.25, 0.5 and 0.75 of its streamed bytes, with prefetch NONE and NEXT_LAYER. After warm-up passes
(the order is learned), the engine's bytes read per pass (`get_model_statistics`) are divided by the optimum for
the same block sizes and the budget the engine actually used (`budget_bytes`, after its own rounding): exact for
equal layers. Bytes are deterministic, so this measures policy, not speed. Target (#16): <= 1.05 x the optimum.

    python3 benchmarks/residency.py [--layers 8] [--hidden 1024] [--passes 4] [--json PATH]
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--passes", type=int, default=14, help="measured passes (14: two of the optimum's 7-pass cycle)")
    p.add_argument("--smoke", action="store_true", help="small layers (make test's smoke check)")
    p.add_argument("--time-budget-s", type=float, default=None, help="accepted for run_all.py")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.passes = 256, 3

    import torch
    import transformers

    import tensorstream as ts

    torch.set_num_threads(2)
    cfg = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                                   vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    plain = transformers.LlamaForCausalLM(cfg).eval()
    layer_bytes = sum(t.numel() * t.element_size() for t in plain.model.layers[0].parameters())
    ids = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    started = time.monotonic()
    results, summary = [], []
    with tempfile.TemporaryDirectory(dir=default_base_dir(), prefix="ts-bench-residency-") as tmp:
        for strategy, lookahead in STRATEGIES.items():
            for fraction in FRACTIONS:
                budget_gb = layer_bytes * args.layers * fraction / 1e9
                model = ts.offload(copy.deepcopy(plain), ts.Config(
                    storage_path=tmp, vram_budget_gb=budget_gb, prefetch_strategy=strategy,
                    min_layer_size=layer_bytes // 2, progress=False))
                with torch.no_grad():
                    for _ in range(3):
                        model(ids)
                    ts.get_model_statistics(model, reset=True)
                    for _ in range(args.passes):
                        model(ids)
                stats = ts.get_model_statistics(model)
                model.cleanup_tensorstream()
                per_pass = stats["bytes_read"] / args.passes / layer_bytes
                budget_layers = int(stats["budget_bytes"] // layer_bytes)
                best = residency_optimum.optimum([1] * args.layers, list(range(args.layers)), budget_layers,
                                                 lookahead)
                row = {"strategy": strategy, "fraction": fraction, "budget_layers": budget_layers,
                       "read_layers_per_pass": per_pass, "optimum_layers_per_pass": best.upper}
                results.append(row)
                print(f"{strategy:10s} budget {fraction:g} ({budget_layers} layers): read {per_pass:.3f} layers per "
                      f"pass, optimum {best.upper:.3f}", flush=True)
                if best.upper > 0:
                    summary.append(summary_row(
                        "residency", f"R1 bytes per pass / optimum, budget {fraction:g}", strategy, per_pass,
                        "layers", baseline="offline optimum", baseline_value=best.upper, target=1.05,
                        higher_is_better=False, note=f"{args.layers} equal layers of {layer_bytes / 1e6:.1f} MB"))
    table = "\n".join(f"{r['strategy']} {r['fraction']:g}: {r['read_layers_per_pass']:.3f} / "
                      f"{r['optimum_layers_per_pass']:.3f}" for r in results)
    report = {"suite": "residency", "machine": machine_description(default_base_dir()), "results": results,
              "summary": summary, "table": table, "elapsed_s": time.monotonic() - started}
    out = args.json or RESULTS / f"residency-{time.strftime('%Y%m%d-%H%M')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
