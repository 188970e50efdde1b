#!/usr/bin/env python3
"""M1-M3: offloaded generation of a model twice its memory budget, TensorStream against accelerate and the plain model.

One Llama-architecture model (seeded random float32 weights, --size-gib, saved once with ``save_pretrained``) and a
budget of --budget-gib. Every arm runs in a fresh process, started with the model's files evicted from the page cache
(mincore-checked), and -- where the machine lets us create a memory cgroup -- inside a cgroup whose limit is the budget
plus --overhead-gib for the interpreter, torch and the KV cache. The limit counts page cache as well as process
memory, so no arm can keep the model in RAM: this is the situation of a user whose machine has less memory than the
model. The arms:

  ts-none, ts-next_layer, ts-adaptive
            tensorstream.offload of the model built on the meta device (no weights in RAM) onto a store written once
            (checksums verified on every read), budget = --budget-gib, one arm per prefetch strategy
  accelerate-disk
            accelerate.disk_offload of the model built on the meta device onto an offload folder written once
            (accelerate's own format: one numpy memmap per tensor), execution device the CPU; accelerate has no
            budget, the memory limit is the only one
  accelerate-auto
            transformers' from_pretrained(device_map="auto", max_memory={"cpu": budget}, offload_folder=...), i.e.
            accelerate keeps what fits the budget in RAM and reads the rest from the checkpoint on every use
  plain     from_pretrained of the whole model, no memory limit (it does not fit in one): the compute time and the
            reference tokens
  ts-pretrained
            tensorstream.from_pretrained(checkpoint) onto a store written once (tensorstream convert, in setup): the
            one-call start of a user whose store is there (M2, warm store: target <= 0.5 x plain)
  ts-pretrained-cold
            the same onto an empty store, so the store is written in the run (M2, cold: target <= 1.1 x plain); run
            once, after the rounds

accelerate's cpu_offload does not apply: it keeps every weight in RAM and moves it to the execution device, which is
the CPU here. Each process measures from its own start (imports included) to the first generated token (M2: time to
first token, cold page cache), then the time of each further token (M1: tokens/s and bytes read per token), and
reports its peak RSS and the cgroup's peak usage (RSS plus page cache: M3). M2 also splits the start into the imports
every arm pays (interpreter, torch, transformers: the floor under any start-up ratio) and what the loader does after
them; M3 also divides what each arm adds to its process after the imports by the weights it keeps in memory between
forwards (TensorStream fills its budget, accelerate's device_map arm keeps less). The lower bound of a token's time is
max(plain compute time per token, bytes read per token / raw read rate), where the raw read rate is the fastest of fio
runs (io_uring, O_DIRECT, queue depth 32, 4 MiB and 64 MiB requests) reading the store's data file cold in the same
round. Every arm's tokens must equal the plain model's.

    python3 benchmarks/generation.py                         # part of make bench
    python3 benchmarks/generation.py --size-gib 2 --budget-gib 1 --rounds 5 --tokens 16
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
import time
from pathlib import Path

import bench_common as common
from bench_common import GB, GIB, REPO, RESULTS, default_base_dir, evict, summary_row

ARMS = ("ts-none", "ts-next_layer", "ts-adaptive", "accelerate-disk", "accelerate-auto", "plain", "ts-pretrained",
        "ts-pretrained-cold")
TS_ARMS = ARMS[:3]
PRETRAINED_STORE = "store-pretrained"  # tensorstream convert of the checkpoint, written once in setup
COLD_STORE = "store-cold"              # ts-pretrained-cold: empty before its run, removed after it
UNLIMITED = " (no limit)"  # key suffix of the M2 runs
# Tokens of the runs without a memory limit: the first (M2), then enough steps for a steady decode rate. With room
# for the store AUTO fills the page cache from its second pass; the blocks each pass evicts differ, so the cache
# holds the streamed part after three or four passes (steps measured: 0.57, 0.47, 0.40, then 0.25-0.30 s).
M2_TOKENS = 12
MODEL_ID = "bench-llama"
SEED = 0


# ---- memory cgroup -----------------------------------------------------------------------------------------------

class MemoryCgroup:
    """A child memory cgroup (v1 or v2) with a limit that covers process memory and page cache alike.

    `available()` is false when this process cannot create one (not root, no memory controller, read-only cgroupfs);
    the arms then run without a limit and the results say so."""

    def __init__(self, path: Path, version: int) -> None:
        self.path, self.version = path, version

    @staticmethod
    def parent() -> "tuple[Path, int] | None":
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            _, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(","):
                base = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
                if (base / "memory.limit_in_bytes").exists():
                    return base, 1
        for line in lines:
            if line.startswith("0::"):
                base = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
                if "memory" in (base / "cgroup.subtree_control").read_text(errors="ignore") if \
                        (base / "cgroup.subtree_control").exists() else False:
                    return base, 2
        return None

    @classmethod
    def create(cls, name: str, limit_bytes: "int | None") -> "tuple[MemoryCgroup | None, str]":
        """A fresh group limited to `limit_bytes`, or unlimited (accounting only: its peak still counts RSS and page
        cache) when None."""
        found = cls.parent()
        if found is None:
            return None, "no writable memory cgroup controller found in /proc/self/cgroup"
        base, version = found
        path = base / name
        try:
            path.mkdir(exist_ok=True)
            group = cls(path, version)
            if limit_bytes is None:
                return group, ""
            group._write("memory.limit_in_bytes" if version == 1 else "memory.max", str(limit_bytes))
            if version == 1 and (path / "memory.memsw.limit_in_bytes").exists():
                try:  # no swap here, but where there is, the limit must not leak into it
                    group._write("memory.memsw.limit_in_bytes", str(limit_bytes))
                except OSError:
                    pass
            return group, ""
        except OSError as error:
            return None, f"cannot create a memory cgroup under {base}: {error.strerror or error}"

    def _write(self, name: str, text: str) -> None:
        with open(self.path / name, "w") as f:
            f.write(text)

    def _read_int(self, name: str) -> int:
        try:
            return int((self.path / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return -1

    def join(self) -> None:
        """Moves the calling process into the group (used as preexec_fn, before the child's exec)."""
        self._write("cgroup.procs", str(os.getpid()))

    def reset_peak(self) -> None:
        try:
            self._write("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak", "0")
        except OSError:
            pass

    def peak_bytes(self) -> int:
        return self._read_int("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak")

    def limit_hits(self) -> int:
        """How often usage reached the limit (v1 failcnt; v2 'max' events): reclaim at work, not an error."""
        if self.version == 1:
            return self._read_int("memory.failcnt")
        try:
            for line in (self.path / "memory.events").read_text().splitlines():
                if line.startswith("max "):
                    return int(line.split()[1])
        except OSError:
            pass
        return -1

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in (self.path / name).read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def drop_page_cache(self) -> None:
        """Uncharges what the last arm left in the page cache (v1 force_empty), so the next one starts at zero."""
        if self.version == 1:
            try:
                self._write("memory.force_empty", "0")
            except OSError:
                pass

    def remove(self) -> None:
        for _ in range(20):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


# ---- the child: one arm in one process ---------------------------------------------------------------------------

def read_proc_io() -> int:
    """Bytes this process caused to be fetched from storage (page-cache hits excluded): /proc/self/io read_bytes."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def status_bytes(field: str) -> int:
    """A memory line of /proc/self/status ("VmHWM", "VmRSS") in bytes, -1 if unreadable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def vm_hwm_bytes() -> int:
    return status_bytes("VmHWM")


def weights_in_memory_bytes(model) -> int:
    """Bytes of parameters backed by memory (accelerate's offloaded ones sit on the meta device; buffers such as the
    rotary frequencies stay in memory in every arm and are not weights). parameters() yields tied ones once."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


def child(args) -> int:
    """Runs one arm and prints one JSON line. Timestamps are CLOCK_MONOTONIC (shared with the parent)."""
    started = time.monotonic()
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if str(REPO / "python") not in sys.path:
        sys.path.insert(0, str(REPO / "python"))
    work = Path(args.work)
    spec = json.loads((work / "model.json").read_text())
    # A batch of --batch prompts: the bench's prompt, rotated by the row index (every row differs).
    prompt_ids = spec["prompt"][:args.prompt_tokens] if args.prompt_tokens else spec["prompt"]
    prompt = torch.stack([torch.roll(torch.tensor(prompt_ids, dtype=torch.long), i) for i in range(args.batch)])
    arm = args.child
    stats_fn = None
    imported = time.monotonic()
    rss_imported = status_bytes("VmRSS")

    if arm == "plain":
        model = AutoModelForCausalLM.from_pretrained(work / "checkpoint", dtype=torch.float32)
    elif arm.startswith("ts-pretrained"):
        import tensorstream
        from tensorstream import torch as ts_torch

        store = work / (COLD_STORE if arm == "ts-pretrained-cold" else PRETRAINED_STORE)
        model = tensorstream.from_pretrained(work / "checkpoint", tensorstream.Config(
            storage_path=str(store), vram_budget_gb=args.budget_bytes / GB, progress=False))
        stats_fn = ts_torch.get_model_statistics
    elif arm == "accelerate-auto":
        model = AutoModelForCausalLM.from_pretrained(
            work / "checkpoint", dtype=torch.float32, device_map="auto",
            max_memory={"cpu": int(args.budget_bytes)}, offload_folder=str(work / "accelerate-auto-offload"))
    else:
        from accelerate import init_empty_weights

        config = LlamaConfig.from_pretrained(work / "checkpoint")
        with init_empty_weights():
            model = LlamaForCausalLM(config)
        if arm == "accelerate-disk":
            from accelerate import disk_offload

            disk_offload(model, str(work / "accelerate-offload"), execution_device="cpu")
        else:
            import tensorstream
            from tensorstream import torch as ts_torch

            strategy = arm.split("-", 1)[1].upper()
            options = {"trace_path": args.trace} if args.trace else {}
            if args.memory_pressure:
                options["memory_pressure_mode"] = args.memory_pressure
            config_ts = tensorstream.Config(storage_path=str(work / "store"), vram_budget_gb=args.budget_bytes / GB,
                                            prefetch_strategy=tensorstream.PrefetchStrategy[strategy], **options)
            model = ts_torch.offload(model, config_ts, model_id=MODEL_ID) or model
            stats_fn = ts_torch.get_model_statistics
    model.eval()
    loaded = time.monotonic()

    tokens, step_s, step_read = [], [], []
    io0 = read_proc_io()
    # Not for ts-pretrained-cold: statistics wait for the store write, which that arm's first token must not.
    ts0 = stats_fn(model) if stats_fn and arm != "ts-pretrained-cold" else None
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        tokens.append(int(token[0]))
        first = time.monotonic()
        io_first = read_proc_io()
        ts_first = stats_fn(model) if stats_fn else None
        for _ in range(args.tokens - 1):
            t0 = time.monotonic()
            io_before = read_proc_io()
            out = model(token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
            tokens.append(int(token[0]))  # row 0's tokens: compared across arms
            step_s.append(time.monotonic() - t0)
            step_read.append(read_proc_io() - io_before)
    done = time.monotonic()
    result = {"arm": arm, "started": started, "imported": imported, "loaded": loaded, "first_token": first,
              "done": done, "tokens": tokens, "step_s": step_s, "step_read_bytes": step_read,
              "first_read_bytes": io_first - io0, "vm_hwm_bytes": vm_hwm_bytes(), "rss_imported_bytes": rss_imported,
              # What the arm keeps in memory between forwards: TensorStream's arena blocks, else resident tensors.
              "weights_held_bytes": None if stats_fn else weights_in_memory_bytes(model),
              "torch_threads": torch.get_num_threads(), "batch": args.batch}
    if stats_fn:
        s_end = stats_fn(model)
        result["ts"] = {
            "backend": s_end["backend"], "budget_bytes": s_end["budget_bytes"], "static_bytes": s_end["static_bytes"],
            "streamed_bytes": s_end["streamed_bytes"], "resident_bytes": s_end["resident_bytes"],
            "first_bytes_read": ts_first["bytes_read"] - (ts0["bytes_read"] if ts0 else 0),
            "decode_bytes_read": s_end["bytes_read"] - ts_first["bytes_read"],
            "decode_stall_s": s_end["stall_time_s"] - ts_first["stall_time_s"],
            "prefetch_hit_rate": s_end["prefetch_hit_rate"], "lookahead": s_end["lookahead"],
            "io_throughput_mbps": s_end["io_throughput_mbps"], "checksum_failures": s_end["checksum_failures"]}
        result["weights_held_bytes"] = s_end["held_bytes"]
        if args.trace:
            result["trace"] = tensorstream.write_trace(model, args.trace)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ---- setup: the model's files, written once and reused ------------------------------------------------------------

def plan_model(size_gib: float) -> dict:
    sys.path.insert(0, str(REPO / "examples"))
    from demo import plan_llama

    return plan_llama(size_gib * GIB, 4)


def model_files(work: Path) -> list:
    files = sorted((work / "checkpoint").glob("*.safetensors"))
    files += sorted((work / "accelerate-offload").glob("*.dat"))
    files += sorted((work / "store" / "models").glob("*/data"))
    files += sorted((work / PRETRAINED_STORE / "models").glob("*/data"))
    return files


def setup(work: Path, plan: dict, prompt_len: int) -> dict:
    """Writes the checkpoint, the TensorStream store and accelerate's offload folder, unless model.json says they
    were written for this plan; returns model.json's contents."""
    spec_path = work / "model.json"
    wanted = {"plan": plan, "seed": SEED, "prompt_len": prompt_len, "layout": 2}
    if spec_path.exists():
        spec = json.loads(spec_path.read_text())
        if {k: spec.get(k) for k in wanted} == wanted and all(p.exists() for p in model_files(work)):
            convert_pretrained(work)
            return spec
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    code = f"""
import json, sys, time, torch
sys.path.insert(0, {str(REPO / 'examples')!r}); sys.path.insert(0, {str(REPO / 'python')!r})
from demo import build_model
from accelerate.utils import offload_state_dict
import tensorstream
from tensorstream import torch as ts_torch
t = time.monotonic()
model = build_model({plan!r}, torch.float32, {SEED})
model.save_pretrained({str(work / 'checkpoint')!r})
offload_state_dict({str(work / 'accelerate-offload')!r}, model.state_dict())
g = torch.Generator().manual_seed({SEED} + 1)
prompt = torch.randint(0, {plan['vocab_size']}, ({prompt_len},), generator=g).tolist()
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
ts_torch.offload(model, tensorstream.Config(storage_path={str(work / 'store')!r}), model_id={MODEL_ID!r})
model.cleanup_tensorstream()
print(json.dumps({{"prompt": prompt, "weight_bytes": weight_bytes, "setup_s": time.monotonic() - t}}))
"""
    print(f"  writing the model's checkpoint, store and accelerate offload folder into {work} ...", flush=True)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"setup failed:\n{done.stderr[-4000:]}")
    spec = {**wanted, **json.loads(done.stdout.strip().splitlines()[-1])}
    spec_path.write_text(json.dumps(spec, indent=1) + "\n")
    convert_pretrained(work)
    return spec


def convert_pretrained(work: Path) -> None:
    """The ts-pretrained arm's store: `tensorstream convert` writes what from_pretrained with the same (default)
    settings reads, and nothing when it is there already."""
    done = subprocess.run([sys.executable, "-m", "tensorstream", "convert", str(work / "checkpoint"), "--storage-path",
                           str(work / PRETRAINED_STORE), "--no-progress"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "python")})
    if done.returncode != 0:
        sys.exit(f"tensorstream convert failed:\n{done.stderr[-4000:]}")


# ---- the parent: rounds of arms ----------------------------------------------------------------------------------

def evict_all(work: Path) -> float:
    """Evicts every file of the model; returns the largest residency left."""
    worst = 0.0
    for path in model_files(work):
        worst = max(worst, evict(path, max_left=0.01))
    return worst


def arm_files(work: Path, arm: str) -> list:
    """The files an arm reads its weights from."""
    if arm == "plain" or arm == "accelerate-auto":
        return sorted((work / "checkpoint").glob("*.safetensors"))
    if arm == "accelerate-disk":
        return sorted((work / "accelerate-offload").glob("*.dat"))
    if arm.startswith("ts-pretrained"):
        return sorted((work / PRETRAINED_STORE / "models").glob("*/data"))
    return sorted((work / "store" / "models").glob("*/data"))


def warm_arm(work: Path, arm: str) -> float:
    """Evicts every model file, then reads the arm's own into the page cache; returns the smallest share cached."""
    evict_all(work)
    least = 1.0
    for path in arm_files(work, arm):
        least = min(least, common.warm_up(path))
    return least


def run_arm(arm: str, args, work: Path, budget_bytes: int, limit_bytes: "int | None", tokens: int,
            trace: str = "", batch: int = 1, cached: bool = False, prompt_tokens: int = 0) -> dict:
    """One arm in a fresh process, its model files evicted first (cached: then its own files read into the page
    cache), inside a memory cgroup limited to `limit_bytes` (None: no limit, the group only measures)."""
    left = warm_arm(work, arm) if cached else evict_all(work)
    group, why = (None, "--no-cgroup") if args.no_cgroup else \
        MemoryCgroup.create(f"tensorstream-bench-{os.getpid()}", limit_bytes)
    if group is not None:
        if not cached:
            group.drop_page_cache()
        group.reset_peak()
    command = [sys.executable, str(Path(__file__).resolve()), "--child", arm, "--work", str(work),
               "--tokens", str(tokens), "--budget-bytes", str(budget_bytes), "--batch", str(batch),
               "--prompt-tokens", str(prompt_tokens)]
    if args.memory_pressure:
        command += ["--memory-pressure", args.memory_pressure]
    if trace:
        command += ["--trace", trace]
    launched = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=group.join if group else None,
                          timeout=args.arm_timeout_s)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        oom = group.oom_kills() if group else 0
        if group:
            group.remove()
        return {"arm": arm, "error": f"exit {done.returncode}" + (f", {oom} OOM kills" if oom else "")
                + f": {done.stderr.strip()[-1500:]}"}
    result = json.loads(lines[-1][len("RESULT "):])
    result["launched"] = launched
    result["residency_before"] = left
    result["ttft_s"] = result["first_token"] - launched
    result["imports_s"] = result["imported"] - launched  # interpreter start + torch + transformers
    result["after_imports_s"] = result["first_token"] - result["imported"]
    if result.get("rss_imported_bytes", -1) > 0 and result["vm_hwm_bytes"] > 0:
        result["rss_added_bytes"] = result["vm_hwm_bytes"] - result["rss_imported_bytes"]
    result["decode_s_per_token"] = statistics.median(result["step_s"]) if result["step_s"] else None
    # Every row of the batch yields a token per step.
    result["decode_tokens_per_s"] = (batch * len(result["step_s"]) / sum(result["step_s"])) if result["step_s"] else None
    result["decode_read_bytes_per_token"] = (sum(result["step_read_bytes"]) / len(result["step_read_bytes"])
                                             if result["step_read_bytes"] else None)
    result["cgroup"] = {"limit_bytes": limit_bytes if group else None, "why_none": why if not group else "",
                        "peak_bytes": group.peak_bytes() if group else None,
                        "limit_hits": group.limit_hits() if group else None}
    if group:
        group.remove()
    return result


def raw_read_rate(data: Path) -> dict:
    """What plain tools read the store's data file at, cold, with O_DIRECT: fio (io_uring, queue depth 32) with 4 MiB
    and with 64 MiB requests (this kind of disk is faster with larger requests), else dd; the fastest, in GB/s."""
    out = {}
    if shutil.which("fio"):
        for bs in ("4M", "64M"):
            evict(data, max_left=0.01)
            done = subprocess.run(["fio", "--name=raw", f"--filename={data}", "--rw=read", f"--bs={bs}", "--direct=1",
                                   "--ioengine=io_uring", "--iodepth=32", "--numjobs=1", "--readonly",
                                   "--output-format=json"], capture_output=True, text=True)
            if done.returncode == 0:
                job = json.loads(done.stdout)["jobs"][0]["read"]
                if job["runtime"]:
                    out[f"fio_{bs}_gb_s"] = job["io_bytes"] / (job["runtime"] / 1e3) / GB
    if not out:
        evict(data, max_left=0.01)
        t0 = time.monotonic()
        done = subprocess.run(["dd", f"if={data}", "of=/dev/null", "bs=64M", "iflag=direct"], capture_output=True)
        if done.returncode == 0:
            out["dd_gb_s"] = data.stat().st_size / (time.monotonic() - t0) / GB
    out["gb_s"] = max(out.values()) if out else float("nan")
    return out


def median_of(rounds: list, arm: str, key: str):
    values = [r[arm][key] for r in rounds if arm in r and "error" not in r[arm] and r[arm].get(key) is not None]
    return statistics.median(values) if values else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dir", type=Path, default=None,
                   help="where the model's files live (created once, reused; default /var/tmp/tensorstream-bench)")
    p.add_argument("--size-gib", type=float, default=3.0, help="weights of the model (float32)")
    p.add_argument("--budget-gib", type=float, default=1.5, help="TensorStream's budget and accelerate's max_memory")
    p.add_argument("--overhead-gib", type=float, default=0.5,
                   help="memory limit = budget + this (interpreter, torch, transformers, activations, KV cache)")
    p.add_argument("--tokens", type=int, default=6, help="tokens generated per arm (the first one is M2's)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--m2-arms", default="ts-adaptive,ts-pretrained,accelerate-disk,accelerate-auto",
                   help="arms run again without a memory limit for M2 and M3 (plain always runs without one)")
    p.add_argument("--arms", default=",".join(ARMS[:6]), help="comma-separated subset of " + ",".join(ARMS[:6]))
    p.add_argument("--no-cold-start", action="store_true",
                   help="skip ts-pretrained-cold (from_pretrained writing its store in the run, once)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-rounds", type=int, default=3)
    p.add_argument("--time-budget-s", type=float, default=420.0,
                   help="stop adding rounds beyond --min-rounds when the next would end after this")
    p.add_argument("--arm-timeout-s", type=float, default=300.0)
    p.add_argument("--memory-pressure", default="", choices=("", "conservative", "balanced", "aggressive"),
                   help="TensorStream's memory_pressure_mode (default: the Config default)")
    p.add_argument("--no-cgroup", action="store_true", help="run every arm without a memory limit")
    p.add_argument("--trace-png", action="store_true", help="also draw the trace as a PNG (needs matplotlib)")
    p.add_argument("--trace-out", type=Path, default=None,
                   help="Chrome trace of one extra ts-adaptive generation (default: results/generation-<date>-trace.json)")
    p.add_argument("--no-trace", action="store_true", help="skip the traced generation")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--smoke", action="store_true",
                   help="a tiny model, one round, three arms: checks that everything runs (python/tests)")
    p.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--budget-bytes", type=float, help=argparse.SUPPRESS)
    p.add_argument("--trace", default="", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--prompt-tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.smoke:
        args.size_gib, args.budget_gib, args.rounds, args.min_rounds, args.tokens = 0.05, 0.025, 1, 1, 3
        args.arms, args.m2_arms = "ts-adaptive,accelerate-disk,plain", "ts-adaptive,ts-pretrained"
        if args.trace_out is None and args.json is not None:
            args.trace_out = args.json.with_name(args.json.stem + "-trace.json")
    return parent(args)


def parent(args) -> int:
    started = time.monotonic()
    base = args.dir or (default_base_dir() / "tensorstream-bench")
    plan = plan_model(args.size_gib)
    work = base / f"generation-{args.size_gib:g}gib"
    arms = [a for a in args.arms.split(",") if a]
    m2_arms = [a for a in args.m2_arms.split(",") if a]
    unknown = set(arms + m2_arms) - set(ARMS)
    if unknown:
        sys.exit(f"unknown arms: {sorted(unknown)}")
    spec = setup(work, plan, args.prompt_len)
    setup_s = time.monotonic() - started
    budget = int(args.budget_gib * GIB)
    limit = budget + int(args.overhead_gib * GIB)
    data = next((work / "store" / "models").glob("*/data"))
    machine = {**common.machine_description(work)}
    print(f"generation: Llama {plan['num_hidden_layers']} layers, hidden {plan['hidden_size']}, float32, "
          f"{spec['weight_bytes'] / GB:.2f} GB; budget {budget / GB:.2f} GB, memory limit {limit / GB:.2f} GB; prompt "
          f"{args.prompt_len} tokens, {args.tokens} generated per arm; arms {', '.join(arms)} (setup {setup_s:.0f} s)",
          flush=True)

    rounds = []
    for r in range(args.rounds):
        round_start = time.monotonic()
        results = {"raw": raw_read_rate(data)}
        # M1 arms under the memory limit (plain cannot run under it), then the M2 arms without one; the order
        # rotates every round and is reversed in odd rounds, so that no arm always follows the same one (a rotation
        # alone keeps every arm behind the same predecessor, whose freed memory it may pay for).
        # plain generates as many tokens as the longest arm, so every arm's tokens are checked against it.
        runs = [(arm, arm, None if arm == "plain" else limit, max(args.tokens, M2_TOKENS) if arm == "plain"
                 else args.tokens) for arm in arms]
        runs += [(f"{arm}{UNLIMITED}", arm, None, M2_TOKENS) for arm in m2_arms]
        if r % 2 == 1:
            runs.reverse()
        runs = runs[r % len(runs):] + runs[:r % len(runs)]
        for key, arm, arm_limit, tokens in runs:
            results[key] = run_arm(arm, args, work, budget, arm_limit, tokens)
            x = results[key]
            if "error" in x:
                print(f"  round {r + 1} {key}: ERROR {x['error']}", flush=True)
            else:
                print(f"  round {r + 1} {key:<26} first token {x['ttft_s']:6.2f} s, then "
                      f"{x['decode_tokens_per_s'] or 0:6.3f} tok/s, read {(x['decode_read_bytes_per_token'] or 0) / GB:.2f}"
                      f" GB/token, peak RSS {x['vm_hwm_bytes'] / GB:.2f} GB, RSS + page cache "
                      f"{(x['cgroup']['peak_bytes'] or 0) / GB:.2f} GB", flush=True)
        rounds.append(results)
        round_s = time.monotonic() - round_start
        if r + 1 >= args.min_rounds and time.monotonic() - started + round_s > args.time_budget_s:
            break

    if not args.no_cold_start and "plain" in arms:
        # Once: from_pretrained onto an empty store, which it writes from the checkpoint before the first token.
        cold = work / COLD_STORE
        shutil.rmtree(cold, ignore_errors=True)
        try:
            x = run_arm("ts-pretrained-cold", args, work, budget, None, 2)
        finally:
            shutil.rmtree(cold, ignore_errors=True)
        rounds[-1]["ts-pretrained-cold"] = x
        print(f"  ts-pretrained-cold (store written in the run): " + (f"ERROR {x['error']}" if "error" in x else
              f"first token {x['ttft_s']:.2f} s, peak RSS {x['vm_hwm_bytes'] / GB:.2f} GB"), flush=True)

    trace = None
    if not args.no_trace and "ts-adaptive" in arms:
        trace_path = (args.trace_out or RESULTS / f"generation-{_dt.datetime.now():%Y%m%d-%H%M%S}-trace.json").resolve()
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        x = run_arm("ts-adaptive", args, work, budget, limit, args.tokens, trace=str(trace_path))
        if "error" in x:
            print(f"  traced run: ERROR {x['error']}", file=sys.stderr)
        trace = {"path": str(trace_path), "error": x.get("error")}
        if args.trace_png and "error" not in x:
            png = trace_path.with_suffix(".png")
            done = subprocess.run([sys.executable, "-m", "tensorstream", "trace-plot", str(trace_path), "-o", str(png)],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "python")})
            trace["png"] = str(png) if done.returncode == 0 else None
            trace["png_error"] = done.stderr.strip()[-500:] if done.returncode else None

    report = summarize(args, plan, spec, rounds, arms, m2_arms, budget, limit, machine, trace,
                       time.monotonic() - started)
    now = _dt.datetime.now(_dt.timezone.utc)
    out_path = args.json or RESULTS / f"generation-{now:%Y%m%d-%H%M%S}-{socket.gethostname()}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report["date_utc"] = now.isoformat(timespec="seconds")
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    print(report["table"])
    print(f"results: {out_path}")
    return 0


def summarize(args, plan, spec, rounds, arms, m2_arms, budget, limit, machine, trace, elapsed) -> dict:
    m2_keys = [f"{a}{UNLIMITED}" for a in m2_arms] + (["plain"] if "plain" in arms else [])
    if any("ts-pretrained-cold" in r for r in rounds):
        m2_keys.append("ts-pretrained-cold")
    keys = arms + [k for k in m2_keys if k not in arms]
    ok = [(i, key, r[key]) for i, r in enumerate(rounds) for key in keys if key in r and "error" not in r[key]]
    reference = next((x["tokens"] for _, key, x in ok if key == "plain"), None)
    # The M2 runs generate fewer tokens: compare the prefix they have.
    mismatches = sorted({f"{key} (round {i + 1})" for i, key, x in ok
                         if reference and x["tokens"][:len(reference)] != reference[:len(x["tokens"])]})
    errors = sorted({f"{key}: {r[key]['error'][:300]}" for r in rounds for key in keys if key in r and "error" in r[key]})
    raw = statistics.median(r["raw"]["gb_s"] for r in rounds) * GB
    compute = median_of(rounds, "plain", "decode_s_per_token")
    weight = spec["weight_bytes"]
    per_arm = {}
    for key in keys:
        x = per_arm[key] = {name: median_of(rounds, key, name) for name in
                            ("ttft_s", "decode_tokens_per_s", "decode_s_per_token", "decode_read_bytes_per_token",
                             "vm_hwm_bytes", "imports_s", "after_imports_s", "rss_added_bytes",
                             "weights_held_bytes")}
        peaks = [r[key]["cgroup"]["peak_bytes"] for r in rounds if key in r and "error" not in r[key]
                 and (r[key]["cgroup"]["peak_bytes"] or 0) > 0]
        x["cgroup_peak_bytes"] = statistics.median(peaks) if peaks else None
        x["memory_limit_bytes"] = None if key == "plain" or key.endswith(UNLIMITED) or args.no_cgroup else limit
        ts_bytes = [r[key]["ts"]["decode_bytes_read"] / max(1, len(r[key]["step_s"])) for r in rounds
                    if key in r and "error" not in r[key] and "ts" in r[key] and r[key]["step_s"]]
        if ts_bytes:
            x["ts_bytes_read_per_token"] = statistics.median(ts_bytes)

    rows = []
    # M1: tokens/s under the memory limit, TensorStream against accelerate's disk offload, and the hardware bound.
    acc = per_arm.get("accelerate-disk", {}).get("decode_tokens_per_s")
    for arm in arms:
        x = per_arm[arm]
        if x["decode_tokens_per_s"] is None:
            continue
        is_ts = arm in TS_ARMS and acc is not None
        rows.append(summary_row("generation", "M1 tokens/s under the memory limit" if arm != "plain" else "M1 tokens/s, no limit",
                                arm, x["decode_tokens_per_s"], "tok/s",
                                baseline="accelerate-disk" if is_ts else None, baseline_value=acc if is_ts else None,
                                target=3.0 if is_ts else None))
    for arm in TS_ARMS:
        x = per_arm.get(arm)
        if not x or x["decode_s_per_token"] is None or compute is None:
            continue
        read = x.get("ts_bytes_read_per_token") or x["decode_read_bytes_per_token"] or 0
        x["lower_bound_s_per_token"] = max(compute, read / raw)
        x["lower_bound_min_read_s_per_token"] = max(compute, max(0, weight - budget) / raw)
        rows.append(summary_row("generation", "M1 s/token over the lower bound", arm, x["decode_s_per_token"], "s/token",
                                baseline="max(compute, bytes read / raw read rate)",
                                baseline_value=x["lower_bound_s_per_token"], target=1.25, higher_is_better=False,
                                note=f"{read / GB:.2f} GB read per token at raw {raw / GB:.2f} GB/s; plain compute "
                                     f"{compute:.3f} s/token; reading only model - budget "
                                     f"({max(0, weight - budget) / GB:.2f} GB) would take "
                                     f"{x['lower_bound_min_read_s_per_token']:.3f} s/token"))
    # M1 without a memory limit (#16 item 4): with room for the store, AUTO reads it through the page cache and
    # later passes are views of cached pages; accelerate's device_map arm warms the cache the same way.
    def median_rate(key):
        x = per_arm.get(key)
        return 1.0 / x["decode_s_per_token"] if x and x.get("decode_s_per_token") else None

    free_acc = [k for k in (f"accelerate-auto{UNLIMITED}", f"accelerate-disk{UNLIMITED}") if median_rate(k)]
    best_acc = max(free_acc, key=median_rate) if free_acc else None
    for key in (f"ts-adaptive{UNLIMITED}", f"ts-pretrained{UNLIMITED}"):
        if median_rate(key) and best_acc:
            rows.append(summary_row("generation", "M1 tokens/s, no limit (median step)", key, median_rate(key),
                                    "tok/s", baseline=best_acc, baseline_value=median_rate(best_acc), target=1.0,
                                    note=f"{M2_TOKENS} tokens; the store fits in memory: AUTO fills the page cache"))
    # M1: ADAPTIVE against the better fixed strategy of the same run (#16 item 3), I/O-bound (cold, limited).
    fixed = [a for a in ("ts-none", "ts-next_layer") if per_arm.get(a) and per_arm[a]["decode_s_per_token"]]
    adaptive = per_arm.get("ts-adaptive")
    if fixed and adaptive and adaptive["decode_s_per_token"]:
        best = min(fixed, key=lambda a: per_arm[a]["decode_s_per_token"])
        rows.append(summary_row("generation", "M1 s/token of ADAPTIVE / the better fixed strategy, I/O-bound",
                                "ts-adaptive", adaptive["decode_s_per_token"], "s/token", baseline=best,
                                baseline_value=per_arm[best]["decode_s_per_token"], target=1.03,
                                higher_is_better=False))
    # M2: process start to first token, cold page cache, no memory limit.
    ts_key = next((k for k in m2_keys if k.startswith("ts-") and not k.startswith("ts-pretrained")), None)
    acc_key = next((k for k in m2_keys if k.startswith("accelerate-disk")), None)
    for key in m2_keys:
        x = per_arm[key]
        if x["ttft_s"] is None:
            continue
        base = acc_key if key == ts_key and acc_key and per_arm[acc_key]["ttft_s"] else None
        rows.append(summary_row("generation", "M2 start to first token, cold", key, x["ttft_s"], "s", baseline=base,
                                baseline_value=per_arm[base]["ttft_s"] if base else None, higher_is_better=False))
    # M2 for the one-call path against transformers' own from_pretrained: the store there (warm store, page cache
    # cold for both) and the store written in the run.
    plain_ttft = per_arm.get("plain", {}).get("ttft_s")
    for key, metric, target in ((f"ts-pretrained{UNLIMITED}", "M2 from_pretrained to first token, store there", 0.5),
                                ("ts-pretrained-cold", "M2 from_pretrained to first token, store written in the run",
                                 1.1)):
        x = per_arm.get(key)
        if x and x["ttft_s"] is not None and plain_ttft:
            rows.append(summary_row("generation", metric, key, x["ttft_s"], "s", baseline="plain from_pretrained",
                                    baseline_value=plain_ttft, target=target, higher_is_better=False))
    # M2's floor (#14 item 6): every arm imports torch and transformers before its loader runs, so no loader's
    # start-up ratio can go below imports / plain; the loaders themselves compare after the imports.
    plain = per_arm.get("plain", {})
    if plain.get("imports_s") and plain_ttft:
        rows.append(summary_row("generation", "M2 imports (interpreter, torch, transformers), paid by every arm",
                                "plain", plain["imports_s"], "s", baseline="plain from_pretrained",
                                baseline_value=plain_ttft, higher_is_better=False,
                                note="the floor under every start-up ratio of this model"))
    for key, where in ((f"ts-pretrained{UNLIMITED}", "store there"),
                       ("ts-pretrained-cold", "store written in the run")):
        x = per_arm.get(key)
        if x and x.get("after_imports_s") and plain.get("after_imports_s"):
            rows.append(summary_row("generation", f"M2 after the imports: from_pretrained to first token, {where}",
                                    key, x["after_imports_s"], "s", baseline="plain from_pretrained",
                                    baseline_value=plain["after_imports_s"], higher_is_better=False))
    # M3: peak memory without a limit: RSS (VmHWM) and RSS + page cache (the memory cgroup's peak), which is what an
    # mmap-based offloader really needs; TensorStream against the lower of accelerate's arms.
    acc_keys = [k for k in m2_keys if k.startswith("accelerate")]
    for metric, field in (("peak RSS", "vm_hwm_bytes"), ("peak RSS + page cache", "cgroup_peak_bytes")):
        acc_values = [per_arm[k][field] for k in acc_keys if per_arm[k][field]]
        for key in m2_keys:
            value = per_arm[key][field]
            if not value:
                continue
            is_ts = key == ts_key and bool(acc_values)
            rows.append(summary_row("generation", "M3 " + metric + ", no limit", key, value / GB, "GB",
                                    baseline="accelerate (lower arm)" if is_ts else None,
                                    baseline_value=min(acc_values) / GB if is_ts else None,
                                    target=1.0 if is_ts else None, higher_is_better=False))

    # M3 against the budget: what TensorStream holds beyond its budget (interpreter, torch, transformers, staging).
    for key in (ts_key, f"ts-pretrained{UNLIMITED}"):
        value = per_arm.get(key, {}).get("vm_hwm_bytes") if key else None
        if value:
            rows.append(summary_row("generation", "M3 peak RSS - budget, no limit", key, (value - budget) / GB, "GB",
                                    baseline="0.5 GiB", baseline_value=0.5 * GIB / GB, target=1.0,
                                    higher_is_better=False))

    # M3 per byte of weights kept (#14 item 7): accelerate's device_map arm keeps less than the budget in memory (it
    # leaves room for one offloaded layer), TensorStream fills it; what each adds to its process after the imports,
    # divided by the weights it holds between forwards, compares the two at equal weights.
    auto_key = f"accelerate-auto{UNLIMITED}"
    auto = per_arm.get(auto_key, {})
    auto_ratio = (auto["rss_added_bytes"] / auto["weights_held_bytes"]
                  if auto.get("rss_added_bytes") and auto.get("weights_held_bytes") else None)
    for key in m2_keys:
        x = per_arm[key]
        if not (x.get("rss_added_bytes") and x.get("weights_held_bytes")):
            continue  # accelerate's disk_offload keeps no weights in memory between forwards
        is_ts = key.startswith("ts-") and auto_ratio is not None
        rows.append(summary_row("generation", "M3 peak RSS added after the imports / weights held, no limit", key,
                                x["rss_added_bytes"] / x["weights_held_bytes"], "x",
                                baseline=auto_key if is_ts else None, baseline_value=auto_ratio if is_ts else None,
                                higher_is_better=False,
                                note=f"{x['rss_added_bytes'] / GB:.2f} GB added, {x['weights_held_bytes'] / GB:.2f} GB "
                                     f"of weights held"))

    fmt = (lambda v, f, scale=1.0: format(v / scale, f) if v is not None else "-")
    lines = [f"Generation (M1-M3): {weight / GB:.2f} GB Llama, budget {budget / GB:.2f} GB, memory limit "
             f"{limit / GB:.2f} GB (M1) or none (M2, M3, plain), {len(rounds)} rounds, medians; raw read rate "
             f"{raw / GB:.2f} GB/s; plain compute {compute or float('nan'):.3f} s/token",
             f"  {'arm':<28} {'1st token s':>11} {'tok/s':>7} {'s/token':>8} {'bound s':>7} {'GB read/tok':>11} "
             f"{'peak RSS GB':>11} {'+cache GB':>9}"]
    for key in keys:
        x = per_arm[key]
        lines.append(f"  {key:<28} {fmt(x['ttft_s'], '11.2f')} {fmt(x['decode_tokens_per_s'], '7.3f')} "
                     f"{fmt(x['decode_s_per_token'], '8.3f')} {fmt(x.get('lower_bound_s_per_token'), '7.3f')} "
                     f"{fmt(x['decode_read_bytes_per_token'], '11.2f', GB)} {fmt(x['vm_hwm_bytes'], '11.2f', GB)} "
                     f"{fmt(x['cgroup_peak_bytes'], '9.2f', GB)}")
    lines.append("  tokens equal to the plain model's: " + ("no plain arm" if not reference else
                                                           "yes" if not mismatches else "NO: " + ", ".join(mismatches)))
    if trace and trace.get("error"):
        lines.append(f"  traced run failed: {trace['error'][:300]}")
    for e in errors:
        lines.append(f"  error: {e}")
    return {"benchmark": "generation", "machine": machine,
            "parameters": {"plan": plan, "weight_bytes": weight, "budget_bytes": budget, "memory_limit_bytes": limit,
                           "tokens": args.tokens, "m2_tokens": M2_TOKENS, "prompt_len": args.prompt_len,
                           "arms": arms, "m2_arms": m2_arms, "rounds_wanted": args.rounds, "cgroup": not args.no_cgroup},
            "raw_read_gb_s": raw / GB, "plain_compute_s_per_token": compute, "per_arm": per_arm,
            "tokens_match": bool(reference) and not mismatches, "mismatches": mismatches, "errors": errors,
            "trace": trace, "rounds": rounds, "summary": rows, "elapsed_s": elapsed, "table": "\n".join(lines)}


if __name__ == "__main__":
    sys.exit(main())
