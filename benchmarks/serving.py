#!/usr/bin/env python3
"""B1: serving over streamed weights. 8 concurrent clients against the same 8 requests sent one at a time.

A Llama checkpoint (tensorstream.testing.tiny_checkpoint: seeded random weights, word-level tokenizer; by default 8
layers of ~47 MB in float32, ~380 MB) is served by `tensorstream serve` (its own process, on 127.0.0.1, as deployed;
the clients run in this one) from a store with a quarter of the weights in budget: every forward step streams most
of the model. Bytes read come from the server's /metrics (tensorstream_read_bytes_total).
Both arms talk HTTP to the same server (`--max-batch 8`), greedy, the same 8 prompts and `max_tokens`:

  serial      one client sends the 8 requests one after the other (each waits for the previous answer)
  concurrent  8 clients send one request each at the same moment; the server batches them (continuous batching)

and report generated tokens per second of wall time (from each answer's `usage`), arms interleaved over rounds,
medians. Greedy tokens do not depend on batching (tests/torch/test_serve_engine.py), so both arms generate the same
tokens. Target (#15): concurrent >= 5 x serial. Two conditions, each its own server over the same store:

  page cache        the store was just written, so its blocks are in the page cache (direct_io auto maps them):
                    a step costs the engine's copy and checksum of every streamed block, and the compute
  disk (O_DIRECT)   direct_io on: every block is read from the disk, as when the model is bigger than RAM

    python3 benchmarks/serving.py [--layers 8] [--hidden 1024] [--max-tokens 16] [--rounds 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python"
sys.path.insert(0, str(PACKAGE))
from bench_common import RESULTS, default_base_dir, machine_description, summary_row  # noqa: E402

PROMPTS = ["once upon a time there lived a cat", "tell me a story about the old dog",
           "where is the red bird and the blue fish", "the small cat sat on the mat in the house",
           "what was the big tree by the river", "hello world , please tell me about one dog",
           "who ran to the new house under the tree", "the green fish swam in the river and the bird flew"]


def run_arm(url: str, name: str, at_once: bool, max_tokens: int) -> dict:
    import httpx

    def one(prompt: str) -> int:
        reply = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": max_tokens,
                                                           "temperature": 0}, timeout=3600)
        reply.raise_for_status()
        return reply.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    if at_once:
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            tokens = sum(pool.map(one, PROMPTS))
    else:
        tokens = sum(one(p) for p in PROMPTS)
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def wait_ready(url: str, server: "subprocess.Popen", timeout_s: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"tensorstream serve exited: {server.communicate()[1][-2000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout_s} s")


def read_bytes(url: str) -> float:
    """The server's tensorstream_read_bytes_total (its /metrics)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "tensorstream_read_bytes_total")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--budget-fraction", type=float, default=0.25)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="a tiny model, one round (for make test's smoke check)")
    p.add_argument("--time-budget-s", type=float, default=None, help="accepted for run_all.py")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        # blocks of 2.4 MB: above the default min_layer_size, so they stream
        args.layers, args.hidden, args.intermediate, args.rounds, args.max_tokens = 2, 256, 512, 1, 4

    from tensorstream.testing.http_server import free_port
    from tensorstream.testing.tiny_checkpoint import write_tiny_llama

    started = time.monotonic()
    conditions = {"page cache": "auto", "disk (O_DIRECT)": "on"}
    results: dict = {}
    with tempfile.TemporaryDirectory(dir=default_base_dir(), prefix="ts-bench-serving-") as tmp:
        checkpoint = write_tiny_llama(Path(tmp) / "llama", hidden_size=args.hidden, layers=args.layers,
                                      intermediate_size=args.intermediate, context=512)
        weights = sum(f.stat().st_size for f in Path(checkpoint).glob("*.safetensors"))
        for condition, direct_io in conditions.items():
            port = free_port()
            env = {**os.environ, "TENSORSTREAM_DIRECT_IO": direct_io, "TENSORSTREAM_PROGRESS": "0",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE), os.environ.get("PYTHONPATH")]))}
            # The server as it is deployed: its own process (`tensorstream serve`), the clients in this one.
            server = subprocess.Popen(
                [sys.executable, "-m", "tensorstream", "serve", str(checkpoint), "--storage-path", str(Path(tmp) / "store"),
                 "--budget-gb", f"{weights * args.budget_fraction / 1e9:.6f}", "--served-model-name", "llama",
                 "--max-batch", str(len(PROMPTS)), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                 "--no-verify"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            url = f"http://127.0.0.1:{port}"
            rounds = results[condition] = {"serial": [], "concurrent": []}
            try:
                wait_ready(url, server)
                run_arm(url, "llama", True, 2)  # warm-up: first-touch costs in neither arm
                for index in range(args.rounds):
                    order = ["serial", "concurrent"] if index % 2 == 0 else ["concurrent", "serial"]
                    for arm in order:
                        before = read_bytes(url)
                        result = run_arm(url, "llama", arm == "concurrent", args.max_tokens)
                        result["bytes_read"] = read_bytes(url) - before
                        rounds[arm].append(result)
                        print(f"{condition}, round {index + 1} {arm}: {result['tokens']} tokens in "
                              f"{result['seconds']:.1f} s = {result['tokens_per_s']:.2f} tokens/s, "
                              f"{result['bytes_read'] / 1e9:.2f} GB read", flush=True)
            finally:
                server.terminate()
                try:
                    server.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    server.kill()
            if args.smoke:
                break
    summary, median = [], {}
    for condition, rounds in results.items():
        median[condition] = {arm: statistics.median(r["tokens_per_s"] for r in rs) for arm, rs in rounds.items()}
        read_per_token = {arm: statistics.median(r["bytes_read"] / r["tokens"] for r in rs)
                          for arm, rs in rounds.items()}
        note = (f"{args.layers} layers, {weights / 1e6:.0f} MB weights, budget {args.budget_fraction:g} x, "
                f"{len(PROMPTS)} requests x max_tokens {args.max_tokens}, greedy; store: {condition}")
        summary += [
            summary_row("serving", f"B1 total generated tokens/s, 8 clients, {condition}", "concurrent (batched)",
                        median[condition]["concurrent"], "tok/s", baseline="serial (one at a time)",
                        baseline_value=median[condition]["serial"], target=5.0, note=note),
            summary_row("serving", f"B1 bytes read per generated token, {condition}", "concurrent (batched)",
                        read_per_token["concurrent"] / 1e6, "MB", baseline="serial (one at a time)",
                        baseline_value=read_per_token["serial"] / 1e6, higher_is_better=False, note=note)]
        ratio = median[condition]["concurrent"] / median[condition]["serial"]
        print(f"B1 {condition}: concurrent {median[condition]['concurrent']:.2f} tok/s vs serial "
              f"{median[condition]['serial']:.2f} tok/s = {ratio:.2f}x (target >= 5x); bytes read per token "
              f"{read_per_token['concurrent'] / 1e6:.0f} vs {read_per_token['serial'] / 1e6:.0f} MB")
    table = "\n".join(f"{r['metric']}: {r['arm']} {r['value']:.3g} {r['unit']} vs {r['baseline']} "
                      f"{r['baseline_value']:.3g} = {r['ratio']:.2f}x" for r in summary)
    report = {"suite": "serving", "table": table, "machine": machine_description(default_base_dir()), "rounds": results,
              "median_tokens_per_s": median, "weights_bytes": weights, "summary": summary,
              "elapsed_s": time.monotonic() - started, "args": vars(args) | {"json": str(args.json)}}
    out = args.json or RESULTS / f"serving-{time.strftime('%Y%m%d-%H%M')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
