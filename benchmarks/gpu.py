"""G1-G4: TensorStream on a GPU, measured side by side in one run (run by tools/gpu_check.sh on a lent H100/H200).

G1  pinned vs pageable host-to-device copy of the same bytes (torch, 5 interleaved rounds, median).
G2  store -> VRAM through the engine (backend cuda: O_DIRECT reads into pinned staging, copies on a copy stream),
    cold (page cache evicted) and warm, against a pinned host-to-device copy of the same bytes (target >= 0.9) and,
    cold, against `dd iflag=direct` of the same file. GPUDIRECT reads are not built yet: its arm is reported as the
    cuda path it falls back to.
G3  offloaded forward of Llama-70B-shaped decoder layers (hidden 8192, MLP 28672, 64 heads / 8 KV heads, bf16) for
    1, 512 and 4096 tokens, at a VRAM budget of half the layers vs all of them resident; with the page cache
    evicted (from storage) and with the host tier holding every block (from RAM).
    Bound: max(resident compute, streamed bytes / pinned H2D rate).
G4  a real generate() offloaded vs the plain model on the GPU: tokens equal, torch.cuda.max_memory_allocated never
    above budget + activations.

`--dry-run` runs every arm on the engine's CPU double of the CUDA driver with tiny sizes (timings meaningless): it
checks the script itself, here, before GPU time is spent on it. Results: JSON in --out (file name with "gpu").
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

import tensorstream as ts  # noqa: E402
from tensorstream import _core  # noqa: E402
from tensorstream.torch.arena import Arena  # noqa: E402
from tensorstream.torch.device import use_cuda_double  # noqa: E402


class Gpu:
    """The device under test: a real GPU, or (dry run) the CPU double with torch on the CPU."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.double = _core.CudaDouble() if dry_run else None
        self.device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
        if not dry_run:
            status = ts.cuda_available()
            if not status or not torch.cuda.is_available():
                sys.exit(f"no GPU: {status.reason or 'this PyTorch has no CUDA'}")
            self.name = torch.cuda.get_device_name(0)
        else:
            self.name = "CPU double of the CUDA driver (dry run)"

    def sync(self) -> None:
        if not self.dry_run:
            torch.cuda.synchronize()

    def seconds(self, action) -> float:
        self.sync()
        start = time.perf_counter()
        action()
        self.sync()
        return time.perf_counter() - start


def median_rate(samples, nbytes):
    return nbytes / statistics.median(samples) / bc.GB


# ---- G1 ----------------------------------------------------------------------------------------------------------

def g1(gpu: Gpu, nbytes: int, rounds: int) -> list:
    if gpu.dry_run:
        return [bc.summary_row("G1", "H2D copy", "pinned", 0.0, "GB/s", note="dry run: no device")]
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    pinned.fill_(1)
    pageable.fill_(1)
    target = torch.empty(nbytes, dtype=torch.uint8, device=gpu.device)
    times = {"pinned": [], "pageable": []}
    for _ in range(rounds):
        for arm, source in (("pinned", pinned), ("pageable", pageable)):
            times[arm].append(gpu.seconds(lambda s=source: target.copy_(s, non_blocking=True)))
    pinned_rate, pageable_rate = median_rate(times["pinned"], nbytes), median_rate(times["pageable"], nbytes)
    return [bc.summary_row("G1", "H2D copy", "pinned", pinned_rate, "GB/s", baseline="pageable",
                           baseline_value=pageable_rate),
            bc.summary_row("G1", "H2D copy", "pageable", pageable_rate, "GB/s")]


def pinned_h2d_rate(gpu: Gpu, nbytes: int, rounds: int) -> float:
    if gpu.dry_run:
        return 0.0
    source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=gpu.device)
    return median_rate([gpu.seconds(lambda: target.copy_(source, non_blocking=True)) for _ in range(rounds)], nbytes)


# ---- G2 ----------------------------------------------------------------------------------------------------------

def write_store(root: Path, blocks: int, block_bytes: int) -> str:
    gen = torch.Generator().manual_seed(1)
    data = {f"layers.{i}": {f"layers.{i}.w": torch.randn(block_bytes // 2, generator=gen).to(torch.bfloat16)}
            for i in range(blocks)}
    return ts.write_model(root, data, model_id="g2").model_id


def stream_store(gpu: Gpu, root: Path, model_id: str, blocks: int, nbytes: int) -> float:
    """Seconds to bring every block of the store into VRAM through the engine (cuda backend), copies complete."""
    storage = _core.StorageDirectory.open_existing(str(root))
    arena = Arena(nbytes, gpu.device)
    engine = _core.Engine(storage, model_id, arena.address, nbytes, backend="cuda", prefetch_strategy="none",
                          device=0, cuda_double=gpu.double)
    try:
        def load_all():
            for b in range(blocks):  # every read in flight at once: the budget holds the whole store
                engine.prefetch(b)
            for b in range(blocks):
                engine.acquire(b).wait()  # host-synchronizes on the block's ready event: its copies are done
                engine.release(b)
        return gpu.seconds(load_all)
    finally:
        engine.close()


def dd_direct_rate(path: Path, nbytes: int) -> float:
    start = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M", "iflag=direct", "status=none"], check=True)
    return nbytes / (time.perf_counter() - start) / bc.GB


def g2(gpu: Gpu, root: Path, blocks: int, block_bytes: int, rounds: int, h2d: float) -> list:
    model_id = write_store(root, blocks, block_bytes)
    data = root / "models" / model_id / "data"
    nbytes = blocks * (block_bytes + 4096)  # each block's slot is rounded up to 4 KiB
    cold, warm, dd = [], [], []
    for _ in range(rounds):
        bc.evict(data)
        cold.append(stream_store(gpu, root, model_id, blocks, nbytes))
        warm.append(stream_store(gpu, root, model_id, blocks, nbytes))
        bc.evict(data)
        dd.append(dd_direct_rate(data, data.stat().st_size))
    moved = blocks * block_bytes
    cold_rate, warm_rate, dd_rate = median_rate(cold, moved), median_rate(warm, moved), statistics.median(dd)
    rows = [bc.summary_row("G2", "store -> VRAM, cold", "cuda", cold_rate, "GB/s", baseline="dd iflag=direct",
                           baseline_value=dd_rate, target=0.9),
            bc.summary_row("G2", "store -> VRAM, warm", "cuda", warm_rate, "GB/s", baseline="pinned H2D",
                           baseline_value=h2d or None, target=0.9),
            bc.summary_row("G2", "store -> VRAM, cold", "gpudirect", cold_rate, "GB/s",
                           note="cuFile reads not built: the cuda path")]
    if h2d:
        rows.append(bc.summary_row("G2", "store -> VRAM, cold vs H2D", "cuda", cold_rate, "GB/s",
                                   baseline="pinned H2D", baseline_value=h2d, target=0.9))
    return rows


# ---- G3, G4 ------------------------------------------------------------------------------------------------------

def llama(hidden: int, mlp: int, heads: int, kv_heads: int, layers: int, vocab: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: a 70B-shaped layer is 1.7 GB, not 3.4 GB in fp32 first
    try:
        return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)


def g3(gpu: Gpu, root: Path, shape: dict, tokens_list, rounds: int, h2d: float) -> list:
    plain = llama(dtype=torch.bfloat16, vocab=1024, **shape)
    layer_bytes = sum(p.numel() * p.element_size() for p in plain.model.layers[0].parameters())
    total = sum(p.numel() * p.element_size() for p in plain.parameters())
    embed = plain.model.embed_tokens.weight.numel() * plain.model.embed_tokens.weight.element_size()
    # The input embedding is read by rows, outside the budget: half the layers plus everything else the GPU holds.
    half = total - embed - layer_bytes * (shape["layers"] - shape["layers"] // 2)
    rows = []
    arms = (("half the layers, from storage", half, 0.0),
            ("half the layers, from RAM (host tier holds all)", half, 2 * total / 1e9),
            ("all resident", 2 * total, 0.0))
    for arm, budget, host_cache_gb in arms:
        model = ts.offload(copy.deepcopy(plain), ts.Config(storage_path=str(root), vram_budget_gb=budget / 1e9,
                                                           min_layer_size=layer_bytes // 2,
                                                           host_cache_gb=host_cache_gb), device="cuda:0")
        data = root / "models" / ts.get_model_statistics(model)["model_id"] / "data"
        for tokens in tokens_list:
            ids = torch.randint(0, 1024, (1, tokens), device=gpu.device)
            with torch.inference_mode():
                model(input_ids=ids)  # warm-up: fills the host tier and the static set
            samples = []
            for _ in range(rounds):
                if host_cache_gb == 0:
                    bc.evict(data)
                ts.get_model_statistics(model, reset=True)
                with torch.inference_mode():
                    samples.append(gpu.seconds(lambda: model(input_ids=ids)))
            stats = ts.get_model_statistics(model)
            rows.append(bc.summary_row("G3", f"forward {tokens} tokens, budget {arm}", "tensorstream",
                                       statistics.median(samples), "s", higher_is_better=False,
                                       note=f"last pass: {stats['bytes_read'] / 1e9:.2f} GB from storage, "
                                            f"{stats['host_tier_bytes'] / 1e9:.2f} GB from the host tier, "
                                            f"H2D {stats['h2d_throughput_gbps']:.1f} GB/s"))
        model.cleanup_tensorstream()
    if h2d:
        bound = shape["layers"] // 2 * layer_bytes / (h2d * bc.GB)
        rows.append(bc.summary_row("G3", "streamed half per forward / pinned H2D rate (lower bound, s)", "bound",
                                   bound, "s", higher_is_better=False,
                                   note="target from RAM <= 1.05 x max(resident forward, this)"))
    return rows


def g4(gpu: Gpu, root: Path, shape: dict, new_tokens: int) -> list:
    plain = llama(dtype=torch.bfloat16, vocab=4096, **shape)
    total = sum(p.numel() * p.element_size() for p in plain.parameters())
    reference = copy.deepcopy(plain).to(gpu.device)
    ids = torch.randint(0, 4096, (1, 32), device=gpu.device)
    expected = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    del reference
    layer_bytes = sum(p.numel() * p.element_size() for p in plain.model.layers[0].parameters())
    budget = int(total * 0.6)  # every layer streams; embeddings and head too (they are bigger than a layer)
    if not gpu.dry_run:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if not gpu.dry_run else 0
    model = ts.offload(copy.deepcopy(plain), ts.Config(storage_path=str(root), vram_budget_gb=budget / 1e9,
                                                       min_layer_size=layer_bytes // 2), device="cuda:0")
    start = time.perf_counter()
    tokens = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    gpu.sync()
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) if not gpu.dry_run else 0
    equal = bool(torch.equal(tokens, expected))
    stats = ts.get_model_statistics(model)
    model.cleanup_tensorstream()
    return [bc.summary_row("G4", "generate tokens equal to the plain model", "tensorstream", float(equal), "bool",
                           target=None, note=f"{new_tokens} tokens in {elapsed:.2f} s"),
            bc.summary_row("G4", "peak VRAM above baseline / (budget + activations)", "tensorstream", peak / 1e9, "GB",
                           baseline="budget", baseline_value=stats["budget_bytes"] / 1e9 + stats["resident_bytes"] / 1e9,
                           higher_is_better=False, note="activations on top of the budget are expected")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=bc.RESULTS)
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory on the disk under test")
    parser.add_argument("--dry-run", action="store_true", help="the CPU double, tiny sizes (checks the script)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    gpu = Gpu(args.dry_run)
    base = args.dir or bc.default_base_dir()
    scratch = Path(base) / "ts-gpu-bench"
    scratch.mkdir(parents=True, exist_ok=True)
    rounds = 2 if args.dry_run else args.rounds
    if args.dry_run:
        sizes = dict(g1=8 << 20, g2_blocks=4, g2_block=4 << 20,
                     g3=dict(hidden=256, mlp=704, heads=8, kv_heads=2, layers=4), g3_tokens=(1, 16),
                     g4=dict(hidden=128, mlp=352, heads=4, kv_heads=2, layers=4), g4_new=4)
    else:
        sizes = dict(g1=1 << 30, g2_blocks=8, g2_block=512 << 20,
                     g3=dict(hidden=8192, mlp=28672, heads=64, kv_heads=8, layers=4), g3_tokens=(1, 512, 4096),
                     g4=dict(hidden=2048, mlp=5632, heads=16, kv_heads=4, layers=8), g4_new=16)
    results = {"machine": bc.machine_description(scratch), "gpu": gpu.name, "dry_run": args.dry_run, "summary": []}
    context = use_cuda_double(gpu.double) if gpu.double is not None else _no_context()
    with context:
        h2d = pinned_h2d_rate(gpu, sizes["g1"], rounds)
        for name, run in (("G1", lambda: g1(gpu, sizes["g1"], rounds)),
                          ("G2", lambda: g2(gpu, scratch / "g2", sizes["g2_blocks"], sizes["g2_block"], rounds, h2d)),
                          ("G3", lambda: g3(gpu, scratch / "g3", sizes["g3"], sizes["g3_tokens"], rounds, h2d)),
                          ("G4", lambda: g4(gpu, scratch / "g4", sizes["g4"], sizes["g4_new"]))):
            started = time.perf_counter()
            rows = run()
            results["summary"].extend(rows)
            for row in rows:
                print(f"{name}: {row['metric']} [{row['arm']}] {row['value']:.4g} {row['unit']}"
                      + (f" (x{row['ratio']:.3g} of {row['baseline']})" if row["ratio"] else ""), flush=True)
            print(f"{name} done in {time.perf_counter() - started:.1f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M")
    path = args.out / f"{stamp}-gpu{'-dry-run' if args.dry_run else ''}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return 0


class _no_context:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
