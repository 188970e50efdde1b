#!/usr/bin/env python3
"""`make bench`: every CPU benchmark in one run, one results file, one table, the plots.

Runs, each as its own process with a share of the time budget (DESIGN.md §8: arms interleaved, medians of rounds):

  C1  codecs.py        chunk codecs on real trained weights: stored/raw against the order-0 bound, GB/s per core
  S3  store_write.py   writing a store (checksums on; uncompressed and compressed) over dd conv=fsync
  S1  engine_read.py   cold read of a >= 4 GiB store per backend over fio / dd with O_DIRECT
  S2  engine_read.py   warm read per backend over a 2-thread buffered pread and over memcpy
  B1  serving.py       tensorstream serve: 8 concurrent clients against the same 8 requests one at a time
  R1  residency.py     bytes read per pass against the offline optimum (residency_optimum.py), NONE / NEXT_LAYER
  B2  batches.py       tokens/s at batch 1, 8, 32, cold and cached, against accelerate's disk offload and plain
  M1-M3 generation.py  a Llama twice its budget generating: TensorStream (each prefetch strategy) against accelerate
                       and the plain model; time to first token; peak memory; plus a traced generation

and writes into benchmarks/results/:

  <date>-<host>.json           every suite's full report, the machine, and the summary rows
  <date>-<host>.md             the summary table (what the README's Performance section quotes)
  <date>-<host>-ratios.png     every ratio against its target
  <date>-<host>-generation.png M1 tokens/s, M2 time to first token, M3 peak memory per arm
  <date>-<host>-trace.json     Chrome trace of one generation (open in https://ui.perfetto.dev or chrome://tracing)
  <date>-<host>-trace.png      the same trace drawn as lanes

A suite that fails is reported in the table and the others still run; the exit status is 1 only when a suite could
not produce results (never because of a timing).

    make bench
    python3 benchmarks/run_all.py --budget-s 900 --only S1,S2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import RESULTS

HERE = Path(__file__).resolve().parent


def suites(stem: Path, quick: bool) -> list:
    """(name, what it covers, command, share of the budget). Shares were sized from measured runs on the 2-core VM
    (benchmarks/README.md): the generation suite needs about half of the 15 minutes."""
    py = [sys.executable]
    if quick:
        return [("codecs", "C1", py + [str(HERE / "codecs.py"), "--smoke"], 0.05),
                ("store_write", "S3", py + [str(HERE / "store_write.py"), "--smoke"], 0.1),
                ("engine_read", "S1 S2", py + [str(HERE / "engine_read.py"), "--smoke"], 0.1),
                ("serving", "B1", py + [str(HERE / "serving.py"), "--smoke"], 0.05),
                ("residency", "R1", py + [str(HERE / "residency.py"), "--smoke"], 0.02),
                ("batches", "B2", py + [str(HERE / "batches.py"), "--smoke"], 0.05),
                ("generation", "M1 M2 M3", py + [str(HERE / "generation.py"), "--size-gib", "0.25",
                                                 "--budget-gib", "0.125", "--rounds", "1", "--min-rounds", "1",
                                                 "--tokens", "3", "--trace-out", str(stem) + "-trace.json",
                                                 "--trace-png"], 0.8)]
    return [("codecs", "C1", py + [str(HERE / "codecs.py")], 0.05),
            ("store_write", "S3", py + [str(HERE / "store_write.py")], 0.14),
            ("engine_read", "S1 S2", py + [str(HERE / "engine_read.py")], 0.25),
            ("serving", "B1", py + [str(HERE / "serving.py")], 0.09),
            ("residency", "R1", py + [str(HERE / "residency.py")], 0.03),
            ("batches", "B2", py + [str(HERE / "batches.py")], 0.2),
            ("generation", "M1 M2 M3", py + [str(HERE / "generation.py"), "--trace-out", str(stem) + "-trace.json",
                                             "--trace-png"], 0.49)]


def budget_args(name: str, seconds: float) -> list:
    """Each script's own time-budget flags (they stop adding rounds past their minimum when the next would not fit)."""
    if name == "store_write":
        return ["--time-budget-s", f"{seconds * 0.85:.0f}"]
    if name == "engine_read":
        return ["--cold-budget-s", f"{seconds * 0.6:.0f}", "--warm-budget-s", f"{seconds * 0.2:.0f}"]
    if name == "generation":
        return ["--time-budget-s", f"{seconds * 0.8:.0f}"]
    return []


# ---- table and plots ---------------------------------------------------------------------------------------------

def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown(rows: list, machine: dict, failures: list, elapsed: float) -> str:
    out = [f"Machine: {machine.get('cpu_model')}, {machine.get('cpu_cores')} cores, {machine.get('ram_gib')} GiB RAM, "
           f"{machine.get('filesystem')} on {machine.get('filesystem_source')}, kernel {machine.get('kernel')}, torch "
           f"{machine.get('torch')}; TensorStream {machine.get('tensorstream_revision')}; `make bench` took "
           f"{elapsed / 60:.1f} min.", "",
           "| id | metric | arm | value | baseline | ratio | target | met |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target = "" if r["target"] is None else ("≥ " if r["higher_is_better"] else "≤ ") + fmt(r["target"])
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        base = f"{r['baseline']} ({fmt(r['baseline_value'])})" if r["baseline"] else ""
        ident, _, metric = r["metric"].partition(" ")
        out.append(f"| {ident} | {metric} | {r['arm']} | {fmt(r['value'])} {r['unit']} | {base} | "
                   f"{fmt(r['ratio'])} | {target} | {met} |")
    for name, why in failures:
        out.append(f"\n**{name} failed**: {why}")
    return "\n".join(out) + "\n"


def plot_ratios(rows: list, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["ratio"] is not None and r["target"] is not None]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(12, 0.32 * len(rows) + 1.2))
    labels = [f"{r['metric']}: {r['arm']} / {r['baseline']}"[:90] for r in rows]
    # A ratio where lower is better is drawn as its inverse, so that every bar reads "right of the line is good".
    values = [r["ratio"] if r["higher_is_better"] else 1.0 / r["ratio"] for r in rows]
    targets = [r["target"] if r["higher_is_better"] else 1.0 / r["target"] for r in rows]
    colors = ["tab:green" if r["met"] else "tab:red" for r in rows]
    y = range(len(rows))
    ax.barh(list(y), values, color=colors)
    ax.scatter(targets, list(y), marker="|", s=300, color="black", label="target", zorder=3)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=7)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ticks = [t for t in (0.125, 0.25, 0.5, 1, 2, 4, 8, 16) if min(values + targets) / 1.5 <= t <= max(values + targets) * 1.5]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("ratio, oriented so that larger is better (log scale); black tick: target")
    ax.set_title("make bench: every ratio against its target")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_generation(report: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_arm = report.get("per_arm") or {}
    unlimited = " (no limit)"
    m1 = [a for a in per_arm if not a.endswith(unlimited) and per_arm[a].get("decode_tokens_per_s")]
    m2 = [a for a in per_arm if (a.endswith(unlimited) or a == "plain") and per_arm[a].get("ttft_s")]
    if not m1:
        return False

    def colors(arms):
        return ["tab:blue" if a.startswith("ts-") else "tab:orange" if a.startswith("accelerate") else "tab:gray"
                for a in arms]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    ax.bar(m1, [per_arm[a]["decode_tokens_per_s"] for a in m1], color=colors(m1))
    for i, a in enumerate(m1):
        bound = per_arm[a].get("lower_bound_s_per_token")
        if bound:
            ax.plot([i - 0.4, i + 0.4], [1.0 / bound] * 2, color="black")
    ax.set_title("M1 tokens/s under the memory limit\n(plain: no limit; black: 1 / lower bound)", fontsize=10)
    ax = axes[1]
    ax.bar([a.replace(unlimited, "") for a in m2], [per_arm[a]["ttft_s"] for a in m2], color=colors(m2))
    ax.set_title("M2 process start to first token,\ncold page cache, no limit (s)", fontsize=10)
    ax = axes[2]
    width = 0.4
    xs = list(range(len(m2)))
    ax.bar([x - width / 2 for x in xs], [(per_arm[a].get("vm_hwm_bytes") or 0) / 1e9 for a in m2], width,
           label="peak RSS", color=colors(m2))
    ax.bar([x + width / 2 for x in xs], [(per_arm[a].get("cgroup_peak_bytes") or 0) / 1e9 for a in m2], width,
           label="peak RSS + page cache (memory cgroup)", color=colors(m2), alpha=0.45, hatch="//")
    ax.set_xticks(xs, [a.replace(unlimited, "") for a in m2])
    ax.set_title("M3 peak memory, no limit (GB)", fontsize=10)
    ax.legend(fontsize=7)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    params = report.get("parameters", {})
    fig.suptitle(f"Llama {params.get('weight_bytes', 0) / 1e9:.2f} GB, budget {params.get('budget_bytes', 0) / 1e9:.2f}"
                 f" GB: TensorStream (blue), accelerate (orange), plain (gray)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- main --------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budget-s", type=float, default=840.0, help="time for the whole run (the target is 15 minutes)")
    p.add_argument("--only", default="", help="comma-separated suites or ids (store_write, engine_read, generation, "
                                              "S1, S2, S3, M1, ...)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round: checks that everything runs")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    started = time.monotonic()
    now = _dt.datetime.now(_dt.timezone.utc)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"{now:%Y%m%d-%H%M}-{socket.gethostname()}{'-quick' if args.quick else ''}"
    chosen = [s for s in suites(stem, args.quick)
              if not args.only or any(o in (s[0], *s[1].split()) for o in args.only.split(","))]
    scratch = Path(tempfile.mkdtemp(prefix="ts-bench-run-"))
    reports, failures, rows = {}, [], []
    total_share = sum(share for *_, share in chosen)
    for name, ids, command, share in chosen:
        left = args.budget_s - (time.monotonic() - started)
        seconds = max(30.0, left * share / total_share)
        total_share -= share
        out = scratch / f"{name}.json"
        print(f"== {name} ({ids}): about {seconds:.0f} s", flush=True)
        t0 = time.monotonic()
        done = subprocess.run(command + budget_args(name, seconds) + ["--json", str(out)])
        took = time.monotonic() - t0
        if done.returncode != 0 or not out.exists():
            failures.append((name, f"exit status {done.returncode} after {took:.0f} s (its output is above)"))
            continue
        report = json.loads(out.read_text())
        report["wall_s"] = took
        reports[name] = report
        rows.extend(report.get("summary", []))
        print(f"== {name} done in {took:.0f} s", flush=True)

    elapsed = time.monotonic() - started
    machine = next((r["machine"] for r in reports.values() if r.get("machine")), {})
    combined = {"date_utc": now.isoformat(timespec="seconds"), "machine": machine, "elapsed_s": elapsed,
                "budget_s": args.budget_s, "quick": args.quick, "summary": rows, "failures": failures,
                "suites": reports}
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(combined, indent=1) + "\n")
    md_path = stem.with_suffix(".md")
    md_path.write_text(markdown(rows, machine, failures, elapsed))
    pictures = []
    try:
        if plot_ratios(rows, Path(str(stem) + "-ratios.png")):
            pictures.append(str(stem) + "-ratios.png")
        if "generation" in reports and plot_generation(reports["generation"], Path(str(stem) + "-generation.png")):
            pictures.append(str(stem) + "-generation.png")
    except ImportError as error:
        print(f"no plots: {error} (pip install matplotlib)", file=sys.stderr)
    print("\n" + md_path.read_text())
    print(f"results: {json_path}, {md_path}" + "".join(f", {x}" for x in pictures))
    print(f"make bench took {elapsed / 60:.1f} min (budget {args.budget_s / 60:.1f} min)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
